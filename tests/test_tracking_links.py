"""The sweep's MLflow experiment says it is a model-training one, and `make ui` prints links that open
the runs table (MLflow 3.17 opens an experiment on its GenAI overview otherwise). The browser side
of this is tests/test_mlflow_ui.py."""

from mlflow.tracking import MlflowClient

from dinoscale import record
from dinoscale.mlflow_ui import describe, main
from dinoscale.tracking import ensure_experiment, runs_table_url


def test_experiments_are_marked_model_training_new_old_and_user_choice_kept(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    new = ensure_experiment(client, "dinoscale-xray", None)
    assert client.get_experiment(new).tags[record.EXPERIMENT_KIND] == record.EXPERIMENT_KIND_TRAINING
    old = client.create_experiment("dinoscale-ct")  # created before the mark existed
    assert ensure_experiment(client, "dinoscale-ct", None) == old
    assert client.get_experiment(old).tags[record.EXPERIMENT_KIND] == record.EXPERIMENT_KIND_TRAINING
    mine = client.create_experiment("dinoscale-em", tags={record.EXPERIMENT_KIND: "finetuning"})
    ensure_experiment(client, "dinoscale-em", None)
    assert client.get_experiment(mine).tags[record.EXPERIMENT_KIND] == "finetuning"


def test_make_ui_prints_each_sweeps_runs_table_link(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = MlflowClient(uri)
    assert describe(uri, "http://127.0.0.1:5000") == [
        f"MLflow UI at http://127.0.0.1:5000: no sweep recorded in {uri} yet (make sweep MODALITY=xray)"
    ]
    exp = ensure_experiment(client, "dinoscale-xray", None)
    client.create_run(exp, tags={record.ROLE: record.ROLE_SWEEP})
    parent = client.create_run(exp, tags={record.ROLE: record.ROLE_SWEEP})  # the latest sweep
    client.create_experiment("unrelated")  # no sweep in it: not listed
    assert main([uri, "http://127.0.0.1:5001/"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"  dinoscale-xray: http://127.0.0.1:5001/#/experiments/{exp}/runs?workflowType=machine_learning"
    assert out[2].endswith(f"/#/experiments/{exp}/runs/{parent.info.run_id}?workflowType=machine_learning")
    assert len(out) == 3 and "unrelated" not in "\n".join(out)
    assert runs_table_url("http://h:1", "7") == "http://h:1/#/experiments/7/runs?workflowType=machine_learning"
