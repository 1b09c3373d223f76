import json

from conftest import run_cli


def test_table_prints_mean_and_std_of_each_run(tmp_path):
    for name, aucs in (("a", [0.9, 0.8]), ("b", [0.7, 0.7])):
        (tmp_path / name).mkdir()
        json.dump({"data": "breastmnist", "mode": "finetune", "encoder": name, "n": 2,
                   "mean": {"auc": sum(aucs) / 2, "acc": 0.5}, "std": {"auc": 0.0707107, "acc": 0.0}},
                  open(tmp_path / name / "metrics.json", "w"))
    r = run_cli("scripts/table.py", str(tmp_path / "a" / "metrics.json"), str(tmp_path / "b" / "metrics.json"))
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("| run | dataset") and len(lines) == 4
    assert lines[2] == "| a | breastmnist | finetune | a | 2 | 0.850 ± 0.071 | 0.500 ± 0.000 |"
    assert "| b | 2 | 0.700 ± 0.071" in lines[3]


def test_pool_compare_pools_seeds_and_matches_scipy(tmp_path):
    from scipy import stats
    a, b = [0.70, 0.72, 0.69], [0.75, 0.74, 0.78, 0.80, 0.77, 0.76]
    for name, values in (("a", a), ("b1", b[:3]), ("b2", b[3:])):
        json.dump({"per_seed": [{"test": {"auc": v}} for v in values]}, open(tmp_path / f"{name}.json", "w"))
    r = run_cli("scripts/pool_compare.py", "--a", str(tmp_path / "a.json"),
                "--b", str(tmp_path / "b1.json"), str(tmp_path / "b2.json"), "--metrics", "auc")
    row = r.stdout.strip().splitlines()[-1]
    assert "(3)" in row and "(6)" in row
    assert f"{stats.ttest_ind(a, b, equal_var=False).pvalue:.3g}" in row
    assert f"{stats.mannwhitneyu(a, b, alternative='two-sided').pvalue:.3g}" in row
