"""`align reward` on the tiny model through the real CLI: packed scoring, learning, resume, scoring API."""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main


def _ranking_file(path, n=80, seed=0):
    """Synthetic but learnable preferences: the helpful phrasing beats the neutral beats the refusal, with
    equal lengths so that length alone cannot explain them."""
    rng = random.Random(seed)
    topics = ["tea", "bikes", "rain", "maps", "bread", "chess", "paint", "trains", "songs", "clocks"]
    lines = []
    for i in range(n):
        t = rng.choice(topics)
        resp = {
            "good": f"gladly here is help on {t} now",
            "mid": f"maybe there is info on {t} now",
            "bad": f"sorry, but no help on {t} here",
        }
        order = ["good", "mid", "bad"]
        lines.append(
            json.dumps(
                {
                    "prompt_id": f"p{i}",
                    "prompt": f"Tell me about {t} ({i})",
                    "responses": [{"id": k, "text": v} for k, v in rng.sample(list(resp.items()), 3)],
                    "ranking": order,
                    "annotator": "ann",
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def prefs(tmp_path_factory, tiny_model_path):
    d = tmp_path_factory.mktemp("prefs")
    _ranking_file(d / "r.jsonl")
    assert (
        main(
            [
                "data",
                "build-preferences",
                str(d / "r.jsonl"),
                "--out",
                str(d / "p"),
                "--set",
                "validation_fraction=0.25",
            ]
        )
        == 0
    )
    return d / "p"


def reward(out, prefs, *extra, resume=False):
    args = [
        "reward",
        "--config",
        "configs/reward.yaml",
        f"output_dir={out}",
        "model.name_or_path=tiny-random-llama",
        f"data.preferences_dir={prefs}",
        "train.learning_rate=3e-3",
        "train.groups_per_batch=4",
        "train.lr_scheduler_type=constant",
        "train.warmup_ratio=0",
        "train.eval_steps=10",
        "train.save_steps=10",
        "gate.min_pairs=20",
        "gate.min_accuracy=0.9",
        *extra,
    ]
    return main(args + (["--resume"] if resume else []))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefs):
    out = tmp_path_factory.mktemp("reward") / "run"
    assert reward(out, prefs, "train.max_steps=30") == 0  # exit 0 = gate passed
    return out


def test_reward_learns_preferences_and_gate_passes(trained):
    m = json.loads((trained / "manifest.json").read_text())
    assert m["status"] == "complete" and m["stage"] == "reward"
    assert m["metrics"]["accuracy"] >= 0.9 and m["metrics"]["pairs"] >= 20
    assert m["metrics"]["length_baseline_accuracy"] == 0.5  # all lengths equal: length explains nothing
    assert m["gates"][0]["verdict"] == "pass"
    assert [p["stage"] for p in m["parents"]] == ["preferences"]
    assert (trained / "calibration.png").stat().st_size > 5000
    losses = [
        json.loads(x)["loss"] for x in (trained / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_heldout_rewards_reproduce_the_gate_accuracy(trained, prefs):
    """heldout_rewards.json holds every held-out response's reward in the validation split's order, so a reviewer
    (or bench/reward_kwise.py) can recompute any pair the gate counted."""
    from datasets import load_from_disk

    from eval.reward_gate import implied_pairs_of

    rewards = json.loads((trained / "heldout_rewards.json").read_text())
    val = list(load_from_disk(str(Path(prefs) / "kwise"))["validation"])
    assert [len(r) for r in rewards] == [len(g["responses"]) for g in val]
    hits = [
        float(r[a] > r[b]) + 0.5 * float(r[a] == r[b])
        for g, r in zip(val, rewards, strict=True)
        for a, b in implied_pairs_of(g["tiers"])
    ]
    metrics = json.loads((trained / "manifest.json").read_text())["metrics"]
    assert len(hits) == metrics["pairs"]
    assert sum(hits) / len(hits) == pytest.approx(metrics["accuracy"])


def test_packed_rewards_equal_one_by_one(trained, prefs):
    from lib.reward_model import GroupCollator, RewardScorer, sequence_rewards

    scorer = RewardScorer(trained)
    prompts = [[{"role": "user", "content": "Tell me about tea"}]] * 3 + ["Hi"]
    responses = [
        "gladly here is help on tea now",
        "sorry, but no help on tea here",
        "ok",
        "Hello there, friend!",
    ]
    batched = scorer.score(prompts, responses, max_batch_tokens=4096)
    single = [scorer.score([p], [r])[0] for p, r in zip(prompts, responses, strict=True)]
    assert batched == pytest.approx(single, abs=1e-4)
    tight = scorer.score(prompts, responses, max_batch_tokens=40)  # forces several rows and batches
    assert tight == pytest.approx(single, abs=1e-4)
    assert batched[0] > batched[1]
    assert GroupCollator and sequence_rewards  # the scorer goes through the same packed path as training


def test_score_command(trained, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"prompt": "Tell me about maps", "response": "gladly here is help on maps now"})
        + "\n"
        + json.dumps({"prompt": "Tell me about maps", "response": "sorry, but no help on maps here"})
        + "\n"
        + "not json\n"
    )
    assert (
        main(["score", "--reward", str(trained), "--input", str(src), "--out", str(tmp_path / "o.jsonl")])
        == 0
    )
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["reward"] > rows[1]["reward"]


def test_resume_equals_uninterrupted(tmp_path, prefs):
    a, b = tmp_path / "a", tmp_path / "b"
    assert reward(a, prefs, "train.max_steps=12", "gate.min_accuracy=0") in (0, 1)
    assert reward(b, prefs, "train.max_steps=12", "train.stop_after_steps=10", "gate.min_accuracy=0") == 3
    assert json.loads((b / "manifest.json").read_text())["status"] == "running"
    assert reward(b, prefs, "train.max_steps=12", "gate.min_accuracy=0", resume=True) in (0, 1)
    wa = load_file(a / "adapter" / "adapter_model.safetensors")
    wb = load_file(b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and any("score" in k for k in wa)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k


def test_plackett_luce_and_bradley_terry_train(tmp_path, prefs):
    for loss in ("plackett_luce", "bradley_terry"):
        out = tmp_path / loss
        assert reward(out, prefs, f"train.loss={loss}", "train.max_steps=4", "gate.min_accuracy=0") in (0, 1)
        m = json.loads((out / "manifest.json").read_text())
        assert m["status"] == "complete"
        if loss == "bradley_terry":
            assert m["counts"]["train_examples"] == m["counts"]["train_pairs"]


def test_a_reward_model_that_failed_its_gate_warns_where_it_is_used(trained, tmp_path, capsys):
    """The warning reads the artifact's own gate record, checked against the hash its manifest holds: an override
    recorded in an unrelated folder that names this artifact silences nothing (issue 34 B8), an edited record
    warns, and the reviewer's override of the record itself does silence it."""
    import shutil

    from core.manifest import read_gate
    from eval.gates import write_gate
    from lib.reward_model import RewardScorer

    failed = tmp_path / "failed"
    shutil.copytree(trained, failed)
    gdir = failed / "gates" / "reward"
    r = read_gate(gdir)
    r.fail("held-out accuracy 0.400 is below the required 0.550")
    write_gate(r, gdir)
    m = json.loads((failed / "manifest.json").read_text())
    m["gates"][0].update({"verdict": "fail", "reasons": r.reasons, "record_sha256": r.content_sha256()})
    (failed / "manifest.json").write_text(json.dumps(m))

    def warned(artifact) -> str:
        capsys.readouterr()
        RewardScorer(artifact)
        return " ".join(capsys.readouterr().err.split())  # the console wraps long lines

    assert "FAILED its reward gate" in warned(failed) and "0.400" in warned(failed)
    decoy = tmp_path / "elsewhere" / "gates" / "reward"
    write_gate(r.model_copy(update={"candidate": str(failed)}), decoy)
    assert main(["gate", "override", str(decoy), "--reviewer", "anyone", "--reason", "decoy"]) == 0
    assert json.loads((failed / "manifest.json").read_text())["overrides"] == []  # no manifest touched
    assert "FAILED its reward gate" in warned(failed)
    assert main(["gate", "override", str(gdir), "--reviewer", "QA", "--reason", "accepted"]) == 0
    assert "FAILED" not in warned(failed)  # the record's own override
    edited = json.loads((gdir / "gate.json").read_text())
    edited["checks"][0]["candidate"] = 0.99  # an edit after the override voids it
    (gdir / "gate.json").write_text(json.dumps(edited))
    assert "was changed after align recorded it" in warned(failed)
    assert "FAILED" not in warned(trained)  # a passed gate: no warning


def test_reward_from_trl_pairs_equals_the_same_pairs_as_ranking_files(tmp_path, tiny_model_path):
    """`data.pairs_file` (TRL's {prompt, chosen, rejected} rows) trains the reward model on the groups that
    `align data import-rankings --from pairwise` + `build-preferences` make of the same rows (two responses, chosen
    first, held out by prompt with the same fraction and seed): the same steps, loss for loss. A folder of them as
    a Hub dataset holds it (data/train-*.jsonl, data/test-*.jsonl) reads its test split as the held-out pairs."""
    rng = random.Random(1)
    topics = ["tea", "bikes", "rain", "maps", "bread", "chess", "paint", "trains"]
    rows = [{"prompt": f"Tell me about {t} ({i})", "chosen": f"gladly here is help on {t} now",
             "rejected": f"sorry, but no help on {t} here"} for i, t in enumerate(rng.choice(topics) for _ in range(40))]  # fmt: skip
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(
            ["data", "import-rankings", "--from", "pairwise", str(pairs), "--out", str(tmp_path / "r.jsonl")]
        )
        == 0
    )
    assert main(["data", "build-preferences", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "p"),
                 "validation_fraction=0.25", "seed=42"]) == 0  # fmt: skip
    common = ["--config", "configs/reward.yaml", "model.name_or_path=tiny-random-llama", "train.max_steps=3",
              "train.logging_steps=1", "train.seed=42", "gate.min_pairs=1", "gate.min_accuracy=0.0"]  # fmt: skip
    a, b = tmp_path / "from-prefs", tmp_path / "from-pairs"
    assert main(["reward", *common, f"output_dir={a}", f"data.preferences_dir={tmp_path / 'p'}"]) in (0, 1)
    assert main(["reward", *common, f"output_dir={b}", "data.preferences_dir=null", f"data.pairs_file={pairs}",
                 "data.validation_fraction=0.25"]) in (0, 1)  # fmt: skip

    def losses(out):
        return [
            json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
        ]

    ma, mb = (json.loads((o / "manifest.json").read_text()) for o in (a, b))
    assert ma["counts"]["train_groups"] == mb["counts"]["train_groups"] > 0
    assert ma["counts"]["eval_groups"] == mb["counts"]["eval_groups"] > 0
    assert losses(a) == losses(b) and len(losses(b)) == 3
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    (hub / "train-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    (hub / "test-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[30:]))
    c = tmp_path / "from-hub"
    assert main(
        [
            "reward",
            *common,
            f"output_dir={c}",
            "data.preferences_dir=null",
            f"data.pairs_file={tmp_path / 'hub'}",
        ]
    ) in (0, 1)
    counts = json.loads((c / "manifest.json").read_text())["counts"]
    assert (counts["train_groups"], counts["eval_groups"]) == (30, 10)
