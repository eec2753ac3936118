"""The lm-evaluation-harness bridge on a task defined here (YAML + local JSONL, no download): its
accuracy is checked against the same multiple-choice scoring computed directly from the model."""

import json

import pytest
import torch

pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "One plus one is", "choices": [" two", " seven", " a dog"], "answer": 0},
    {"question": "Water is", "choices": [" dry", " wet", " square"], "answer": 1},
    {"question": "The sun rises in the", "choices": [" east", " west", " sea"], "answer": 0},
    {"question": "Cats like to", "choices": [" bark", " meow", " fly"], "answer": 1},
    {"question": "Ice is", "choices": [" hot", " cold", " green"], "answer": 1},
]


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "onecomp_tiny.yaml").write_text(
        "task: onecomp_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    return tmp_path


def _direct_accuracy(model, tokenizer) -> float:
    """argmax over choices of log p(choice | question), summed over the choice's tokens."""
    right = 0
    for d in DOCS:
        ctx = tokenizer(d["question"], add_special_tokens=False).input_ids
        scores = []
        for choice in d["choices"]:
            whole = tokenizer(d["question"] + choice, add_special_tokens=False).input_ids
            cont = whole[len(ctx):]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(ids).logits.float().log_softmax(-1)[0, len(ctx) - 1:-1]
            scores.append(logp.gather(1, torch.tensor(cont)[:, None]).sum().item())
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    return right / len(DOCS)


def test_eval_tasks_runs_lm_eval_on_a_checkpoint(tiny_model_dir, task_dir, tmp_path, capsys, monkeypatch):
    import onecomp
    from onecomp import Registry
    from onecomp.checkpoint import save_checkpoint
    from onecomp.cli import main
    from onecomp.models import load_model

    base = load_model(str(tiny_model_dir))
    windows = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    reg = Registry.default()
    onecomp.compress(base.model, config={"plan": {"quantizer": {"name": "rtn", "bits": 4, "group_size": 32}}},
                     windows=windows, registry=reg)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(base.model, base.tokenizer, ckpt, reg, base_model=str(tiny_model_dir), config={}, stages=[])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", str(ckpt), "--tasks", "onecomp_tiny", "--include-path", str(task_dir),
                 "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    acc = out["tasks"]["onecomp_tiny"]["acc,none"]
    loaded = load_model(str(ckpt))
    assert acc == pytest.approx(_direct_accuracy(loaded.model, loaded.tokenizer))
    assert "ppl:kjv-gospels" not in out["tasks"]  # perplexity only with an explicit --text

