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
