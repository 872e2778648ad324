"""Integration: the training job on real local Ray Train + DeepSpeed (2 workers x 1 CPU, gloo)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

pytestmark = pytest.mark.integration


def _cfg(smoke_cfg, **train):
    base = dict(num_workers=2, cpus_per_worker=1, max_failures=1, log_every=2)
    return dataclasses.replace(
        smoke_cfg,
        tasks=["multiplication"],
        train=dataclasses.replace(smoke_cfg.train, **{**base, **train}),
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, smoke_cfg):
    from rayjobs import data
    from rayjobs.common import JobContext

    out = str(tmp_path_factory.mktemp("train-run"))
    data.run(JobContext(dataclasses.replace(smoke_cfg, tasks=["multiplication"]), out))
    return out


def test_ft_and_eift_train_under_zero2_with_two_workers(ray_session, smoke_cfg, run_dir):
    """Loss goes down, every parameter changes, the model reloads and generates; a rerun skips."""
    from rayjobs import train
    from rayjobs.common import JobContext, read_manifest
    from selfcorrect.generation import generate
    from selfcorrect.models import build_model, load_model

    # A 10-step base and lr 3e-3 (smoke: 30 steps, fine-tunes at 1e-3): 14 steps must visibly learn
    cfg = _cfg(
        smoke_cfg,
        methods=["ft", "eift"],
        zero_stage=2,
        max_steps=14,
        checkpoint_every=7,
        lr=3e-3,
        base_steps=10,
    )
    ctx = JobContext(cfg, run_dir)
    train.run(ctx)
    init, _ = build_model(cfg.model.preset, cfg.model.max_length, seed=cfg.seed)
    for method in ("ft", "eift"):
        d = os.path.join(run_dir, "multiplication", "models", method)
        assert os.path.exists(os.path.join(d, "model.safetensors"))
        hist = json.load(open(os.path.join(d, "metrics.json")))
        assert hist[-1]["step"] == 14
        assert hist[-1]["loss"] < hist[0]["loss"] - 0.3, hist
        assert os.path.exists(os.path.join(d, "metrics.parquet"))
        if method == "eift":
            assert "loss_recognition" in hist[-1] and "loss_correction" in hist[-1]
        model, tok = load_model(d)
        for (name, p), q in zip(model.named_parameters(), init.parameters(), strict=True):
            assert not torch.equal(p, q), f"{method}: {name} did not change"
        out = generate(model, tok, ["12*34\n"], max_new_tokens=20)
        assert len(out) == 1 and out[0]
    models = os.path.join(run_dir, "multiplication", "models")
    assert sorted(os.listdir(models)) == ["base", "eift", "ft"]  # no checkpoints left behind
    stages = read_manifest(ctx)["stages"]
    # base, FT and EIFT: one Ray Train run, each model its own manifest record
    chain = ["multiplication/base", "multiplication/ft", "multiplication/eift"]
    for key in chain:
        assert stages[key]["status"] == "done" and stages[key]["chain"] == chain
    assert stages[chain[0]]["startup_s"] > 0
    # Same config again: both methods are skipped, the models stay as they are.
    mtime = os.path.getmtime(os.path.join(run_dir, "multiplication", "models", "ft"))
    train.run(ctx)
    assert os.path.getmtime(os.path.join(run_dir, "multiplication", "models", "ft")) == mtime
    # Another injection rate: the models of clean traces (base, FT) stay, EIFT trains again.
    kept = {m: os.path.getmtime(os.path.join(models, m)) for m in ("base", "ft", "eift")}
    rate = dataclasses.replace(cfg.train, injection_rate=cfg.train.injection_rate / 2)
    train.run(JobContext(dataclasses.replace(cfg, train=rate), run_dir))
    now = {m: os.path.getmtime(os.path.join(models, m)) for m in kept}
    assert now["base"] == kept["base"] and now["ft"] == kept["ft"]
    assert now["eift"] != kept["eift"]
    assert read_manifest(ctx)["stages"][chain[2]]["config_hash"] != stages[chain[2]]["config_hash"]


def test_hybrid_without_harvest_fails_clearly(ray_session, smoke_cfg, run_dir):
    from rayjobs import train
    from rayjobs.common import JobContext

    cfg = _cfg(smoke_cfg, methods=["hybrid"], max_steps=2)
    with pytest.raises(FileNotFoundError, match="harvest"):
        train.run(JobContext(cfg, run_dir))
    assert not os.path.exists(os.path.join(run_dir, "multiplication", "models", "hybrid"))


def _weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}


@pytest.mark.parametrize(
    "case,method,options",
    [
        # Sharded parameters: resume re-partitions them, the final save must gather them.
        ("zero3", "ft", {"zero_stage": 3}),
        # ZeRO-2 with adapters (and InSeC's token rows) on the BPE stand-in, merged into the
        # saved model.
        ("lora", "insec", {"zero_stage": 2}),
    ],
    ids=["zero3", "lora"],
)
def test_killed_worker_resumes_from_checkpoint_and_finishes(
    ray_session, smoke_cfg, run_dir, tmp_path, standin_models, case, method, options
):
    """Rank 1 dies hard at step 6 (after the step-4 checkpoint); FailureConfig restarts the
    group, which resumes at step 4 from model/optimizer/scheduler/RNG state and finishes.
    The saved model loads with ``from_pretrained`` as a plain causal LM."""
    from transformers import AutoModelForCausalLM

    from rayjobs import train
    from selfcorrect.models import insec_token_ids, load_tokenizer

    cfg = _cfg(smoke_cfg, max_steps=10, checkpoint_every=4, **options)
    init_dir = standin_models["qwen2" if case == "lora" else "llama"]
    model_cfg = dataclasses.replace(
        cfg.model, path=init_dir, max_length=512, lora=case == "lora", lora_r=4
    )
    cfg = dataclasses.replace(cfg, model=model_cfg)
    marker = tmp_path / "crashed"
    out = os.path.join(str(tmp_path), "model")
    eift_out = os.path.join(str(tmp_path), "eift")
    jobs = [train.ModelJob(method, out, cfg, "under-test")]
    if case == "zero3":  # then EIFT from the gathered model, in the same Ray Train run (chain)
        jobs.append(train.ModelJob("eift", eift_out, cfg, "eift", init_model_path=out, max_steps=4))
    results = train.train_chain(
        "multiplication",
        jobs,
        train_path=train.data_path(run_dir, "multiplication"),
        crash={"rank": 1, "step": 6, "marker": str(marker)},
    )
    last = results[0]
    assert marker.exists(), "the crash hook never fired"
    assert last["step"] == 10
    state = json.load(open(os.path.join(out, "train_state.json")))
    assert state["resumed_at"] == [4]
    hist = json.load(open(os.path.join(out, "metrics.json")))
    assert [h["step"] for h in hist] == [2, 4, 6, 8, 10]  # no step lost or repeated

    model = AutoModelForCausalLM.from_pretrained(out)  # gathered, merged: a plain model
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    before, after = _weights(init_dir), _weights(out)
    assert {k: v.shape for k, v in after.items() if k in before and "embed" not in k} == {
        k: v.shape for k, v in before.items() if "embed" not in k
    }
    tok = load_tokenizer(out)
    assert model.get_input_embeddings().num_embeddings == len(tok)  # InSeC's tokens added
    changed = {k for k in before if "embed" not in k and not torch.equal(before[k], after[k])}
    if case == "zero3":
        assert changed == {k for k in before if "embed" not in k}, "a shard was not gathered"
        # EIFT under ZeRO-3 from the gathered FT model, after it in the same chain.
        last = results[1]
        assert last["step"] == 4 and "loss_recognition" in last
        assert json.load(open(os.path.join(eift_out, "train_state.json")))["resumed_at"] == []
        eift = _weights(eift_out)
        assert all(not torch.equal(eift[k], after[k]) for k in changed), "EIFT left FT as is"
    else:  # LoRA: only the adapted attention projections moved, merged into their weights
        assert changed and all(
            k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for k in changed
        ), changed
        emb = after["model.embed_tokens.weight"]
        n_old = before["model.embed_tokens.weight"].shape[0]
        assert torch.equal(emb[:n_old], before["model.embed_tokens.weight"])
        close = insec_token_ids(tok)[1]  # </mistake>: trained (InSeC's signal), not frozen
        assert not torch.allclose(emb[close], emb[:n_old].mean(0))
