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


def test_table_errors_are_one_line(tmp_path):
    (tmp_path / "torn.json").write_text('{"data": "breastmnist", "mea')
    r = run_cli("scripts/table.py", str(tmp_path / "torn.json"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "torn.json is not valid JSON" in r.stderr
    (tmp_path / "other.json").write_text("{}")
    r = run_cli("scripts/table.py", str(tmp_path / "other.json"))
    assert r.returncode == 2 and "not a metrics.json" in r.stderr and "Traceback" not in r.stderr


def test_compare_pools_seeds_and_matches_scipy(tmp_path):
    from scipy import stats
    a, b = [0.70, 0.72, 0.69], [0.75, 0.74, 0.78, 0.80, 0.77, 0.76]
    for name, values in (("a", a), ("b1", b[:3]), ("b2", b[3:])):
        (tmp_path / name).mkdir()
        json.dump({"per_seed": [{"test": {"auc": v, "acc": 0.5 + v / 10}} for v in values]},
                  open(tmp_path / name / "metrics.json", "w"))
    r = run_cli("scripts/compare.py", "--a", str(tmp_path / "a"),  # a run directory
                "--b", str(tmp_path / "b1" / "metrics.json"), str(tmp_path / "b2" / "metrics.json"),
                "--metrics", "auc,acc", "--names", "random", "BYOL", "--json", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "A: random" in lines[0] and "B: BYOL" in lines[0]
    auc_row = next(line for line in lines if line.startswith("| auc |"))
    assert "(n=3)" in auc_row and "(n=6)" in auc_row
    welch, mwu = stats.ttest_ind(a, b, equal_var=False).pvalue, stats.mannwhitneyu(a, b, alternative="two-sided").pvalue
    assert auc_row.endswith(f"| {welch:.3f} | {mwu:.3f} |")
    saved = json.load(open(tmp_path / "c.json"))
    assert saved["metrics"]["auc"]["welch_p"] == welch and saved["metrics"]["auc"]["n_b"] == 6


def test_compare_errors_are_one_line(tmp_path):
    (tmp_path / "torn.json").write_text('{"per_seed": [{"te')
    (tmp_path / "ok.json").write_text(json.dumps({"per_seed": [{"test": {"auc": 0.7}}]}))
    for argv, message in ((["--a", str(tmp_path / "torn.json"), "--b", str(tmp_path / "ok.json")], "not valid JSON"),
                          (["--a", str(tmp_path / "nope.json"), "--b", str(tmp_path / "ok.json")], "cannot read"),
                          (["--a", str(tmp_path / "ok.json"), "--b", str(tmp_path / "ok.json"), "--metrics", "f1"],
                           "no test metric 'f1' (it has: auc)")):
        r = run_cli("scripts/compare.py", *argv)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
