"""Builders shared by several test modules (tiny classifier experts, RI recipes), kept out of
the test modules themselves so that no test module imports another."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import read_any, write_recipe

from mergekit_ri.events import MergeEvents
from mergekit_ri.kernels.source import TensorSource
from mergekit_ri.methods import reference
from mergekit_ri.methods import wudi as W
from mergekit_ri.methods.registry import TensorParams
from mergekit_ri.resume import JOURNAL

EXPERTS = ["e0", "e1", "e2"]


def vit(num_labels: int, seed: int):
    import transformers

    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(config)


def make_classifiers(root: Path, build, label_counts: list[int], drift: float = 0.01) -> dict[str, Path]:
    """A base and experts whose backbones drift from it and whose heads have their own sizes."""
    base = build(2, 0)
    base.save_pretrained(root / "base")
    folders = {"base": root / "base"}
    for i, labels in enumerate(label_counts):
        expert = build(labels, 100 + i)
        backbone = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier")}
        expert.load_state_dict(backbone, strict=False)
        with torch.no_grad():
            for name, param in expert.named_parameters():
                if not name.startswith("classifier"):
                    param.add_(torch.randn_like(param) * drift)
        expert.config.id2label = {j: f"task{i}-class{j}" for j in range(labels)}
        expert.config.label2id = {v: k for k, v in expert.config.id2label.items()}
        folders[f"e{i}"] = root / f"e{i}"
        expert.save_pretrained(folders[f"e{i}"])
    return folders


def ri_recipe(tmp_path: Path, vits, aux, method: str = "ties", **ri) -> Path:
    """A merge recipe over the tiny ViT experts with a resolve_interference section."""
    settings = {"auxiliary_data": str(aux), "steps": 20, "batch_size": 16, "lr": 1e-3, **ri}
    return write_recipe(
        tmp_path / f"ri-{method}.yaml",
        merge_method=method,
        base_model=str(vits["base"]),
        models=[{"model": str(vits[e])} for e in EXPERTS],
        out_dtype="float32",
        resolve_interference=settings,
    )


# ---- moved from test_methods.py ----


def ref_task_arithmetic(base, experts, weights, lam=1.0):
    return reference.task_arithmetic(base, torch.stack(experts), weights, lam)


def ref_linear(experts, weights):
    return reference.linear(torch.stack(experts), weights)


def ref_trim(tau, density):
    """Keep every entry whose magnitude is >= the k-th largest (ties kept), k = floor(density*n)."""
    return reference.trim(tau, reference.magnitude_threshold(tau, density))


def ref_disjoint_merge(taus, weights, normalize=True):
    """TIES elect (with the zero-sum majority rule) + disjoint (weighted) mean of trimmed taus."""
    weighted = reference.per_expert(weights, torch.stack(taus)) * torch.stack(taus)
    return reference.disjoint_mean(weighted, reference.elect_signs(weighted), weights, normalize)


def assert_close(merged, expected, name, dtype=torch.float32):
    exp = expected.to(dtype).float()
    assert merged.dtype == dtype, name
    torch.testing.assert_close(merged.float(), exp, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---- moved from test_kernels.py ----


def ref_threshold(tau: torch.Tensor, density: float) -> float:
    flat = tau.flatten().abs()
    k = int(density * flat.numel())
    if k <= 0:
        return float("inf")
    if k >= flat.numel():
        return 0.0
    return float(torch.sort(flat, descending=True).values[k - 1])


def awkward_inputs(kind: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g)
    if kind == "normal":
        tau = 0.01 * torch.randn(3, n, generator=g)
    elif kind == "heavy":
        tau = 0.01 * torch.randn(3, n, generator=g) ** 5
    elif kind == "ties":  # a few distinct magnitudes: the k-th value is tied many times
        tau = 0.01 * torch.randint(-3, 4, (3, n), generator=g).float()
    elif kind == "zeros":
        tau = torch.zeros(3, n)
    else:  # sparse: mostly exact zeros
        tau = 0.01 * torch.randn(3, n, generator=g) * (torch.rand(3, n, generator=g) < 0.05)
    return base.bfloat16(), (base + tau).bfloat16()


class Chunked(TensorSource):
    """Tensors in memory handed out in chunks of `step` entries, as the engine's row reader does:
    what needs the whole tensor (a majority sign, a threshold) must still be the whole tensor's."""

    def __init__(self, base: torch.Tensor, experts: torch.Tensor, step: int) -> None:
        super().__init__(base, experts)
        self.step = step

    def chunks(self):
        for start in range(0, self.numel, self.step):
            yield start, self.base[start : start + self.step], self.experts[:, start : start + self.step]


def cancelling_inputs(n: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    """Task vectors where many entries sum to exactly 0 with non-zero parts, and most non-zero
    sums are negative: the zero-sum entries must take the tensor's (negative) majority sign."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).bfloat16().float()
    a = (0.25 * torch.randint(1, 4, (n,), generator=g)).float()
    tau = torch.stack([a, -a, -0.5 * a])
    cancel = torch.rand(n, generator=g) < 0.3
    tau[2][cancel] = 0.0  # a + (-a) + 0 = 0 exactly
    return base, base + tau


# ---- moved from test_wudi.py ----

NAMES = ["a", "b", "c"]


def paper_loss(merged, taus, weights):
    """Σ_i w_i ‖(M − τ_i) τ_iᵀ‖²_F, literally."""
    return sum(w * ((merged - t) @ t.T).square().sum() for t, w in zip(taus, weights))


def paper_weights(taus):
    return [1.0 / t.square().sum() for t in taus]


def autograd_gradient(merged, taus, weights):
    m = merged.clone().requires_grad_(True)
    paper_loss(m, taus, weights).backward()
    return m.grad


def adam_loop(init, taus, weights, iterations, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """Adam (Kingma & Ba) written out, on autograd gradients of the paper's loss."""
    m = init.clone()
    first, second = torch.zeros_like(m), torch.zeros_like(m)
    for k in range(1, iterations + 1):
        g = autograd_gradient(m, taus, weights)
        first = beta1 * first + (1 - beta1) * g
        second = beta2 * second + (1 - beta2) * g * g
        m = m - lr * (first / (1 - beta1**k)) / ((second / (1 - beta2**k)).sqrt() + eps)
    return m


def momentum_loop(init, taus, weights, iterations, lr, momentum):
    """Heavy-ball SGD as torch defines it (buffer = gradient on the first step)."""
    m, buffer = init.clone(), torch.zeros_like(init)
    for _ in range(iterations):
        buffer = momentum * buffer + autograd_gradient(m, taus, weights)
        m = m - lr * buffer
    return m


def gram_and_cross(taus, weights):
    gram = sum(w * t.T @ t for t, w in zip(taus, weights))
    cross = sum(w * t @ t.T @ t for t, w in zip(taus, weights))
    return gram, cross


def ref_aswudi(init, taus, weights):
    """M0 + (B V_K Λ_K⁻¹ − M0 V_K) V_Kᵀ on the top K = ⌈(Σ√λ)²/Σλ⌉ eigenvectors of G."""
    gram, cross = gram_and_cross(taus, weights)
    lam, vec = torch.linalg.eigh(gram)
    lam = lam.clamp(min=0)
    k = math.ceil(lam.sqrt().sum() ** 2 / lam.sum() - 1e-9)
    vk, lk = vec[:, -k:], lam[-k:]
    return init + (cross @ vk / lk - init @ vk) @ vk.T


def problem(taus, init=None):
    weights = W.task_weights(taus)
    return W.build_problem(taus, weights, taus.sum(0) if init is None else init)


def params(**values):
    defaults = dict(
        solver="aswudi",
        iterations=300,
        lr=1e-5,
        momentum=0.9,
        t=None,
        rank_ratio=0.65,
        scope="linear",
        eigh_dtype="float64",
        **{"lambda": 1.0},
    )
    defaults.update(values)
    return TensorParams({}, defaults)


def random_taus(n, out, inp, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(n, out, inp, generator=g, dtype=torch.float64)
    return torch.randn(n, out, rank, generator=g, dtype=torch.float64) @ torch.randn(
        n, rank, inp, generator=g, dtype=torch.float64
    )


def load_family(family):
    base = {k: v.double() for k, v in read_any(family["base"]).items()}
    experts = [{k: v.double() for k, v in read_any(family[n]).items()} for n in NAMES]
    return base, experts


# ---- different vocabularies (tests/test_vocab.py) ----

ADDED_TOKENS = ("<tool>", "<think>", "</think>")


def tiny_llama(vocab: int, seed: int, tie: bool = False):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def make_vocab_models(root: Path, tie: bool = False, template: str | None = None) -> dict[str, Path]:
    """base and `a` share a 200-token BPE tokenizer; `b` has another one trained on other text,
    with 3 added tokens (203 rows). Backbones drift from the base; embeddings are each model's own.
    `template`: a chat template for `a` and `b` (the base has none)."""
    from mergekit_ri.synthetic import tiny_tokenizer

    first = tiny_tokenizer("abcdefghijklmnop", 0)
    second = tiny_tokenizer("efghijklmnopqrstuvwxyz", 1, ADDED_TOKENS)
    base = tiny_llama(200, 0, tie)
    folders = {}
    for name, tok, seed in (("base", first, 0), ("a", first, 1), ("b", second, 2)):
        model = base if name == "base" else tiny_llama(len(tok), seed, tie)
        if name != "base":
            with torch.no_grad():
                for key, param in model.named_parameters():
                    if "embed_tokens" not in key and "lm_head" not in key:
                        param.copy_(base.get_parameter(key) + 0.01 * torch.randn_like(param))
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tok.chat_template = template if name != "base" else None
        tok.save_pretrained(folders[name])
    return folders


def save_pickled(folder: Path, source: Path, shards: int = 1) -> Path:
    """The safetensors checkpoint `source` re-saved as transformers' pickled `pytorch_model.bin`
    (with `pytorch_model.bin.index.json` when shards > 1), config.json beside it."""
    import json
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    tensors = read_any(source)
    names = list(tensors)
    if shards <= 1:
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for index in range(shards):
            file = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
            part = {k: tensors[k] for k in names[index * per : (index + 1) * per]}
            torch.save(part, folder / file)
            weight_map.update({k: file for k in part})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(source / "config.json", folder / "config.json")
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by its relative path: outputs compared byte for byte."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def journal_units(staging: Path) -> list[int]:
    """The work units a staging folder's journal records as finished."""
    lines = (staging / JOURNAL).read_text().splitlines()[1:]
    return sorted({json.loads(line)["unit"] for line in lines if line.strip()})


def interrupted_cli_merge(args: list[str], out: Path, sig: int, after: int = 3, group: bool = False):
    """`python -m mergekit_ri.cli ARGS` in a real process, sent `sig` once its staging folder's
    journal records `after` finished units (with `group`, to its whole process group, as a
    terminal's Ctrl-C is): (the finished process, its stderr, the staging folder). Fails if the
    merge finished before the signal."""
    import mergekit_ri

    env = {**os.environ, "PYTHONPATH": str(Path(mergekit_ri.__file__).parents[1])}
    command = [sys.executable, "-m", "mergekit_ri.cli", *map(str, args)]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=group)
    staging = out.parent / f".{out.name}.ri-merge-partial-{proc.pid}"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        journal = staging / JOURNAL
        if journal.is_file() and len(journal.read_text().splitlines()) > after:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            break
        time.sleep(0.002)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not out.exists(), f"the merge finished before the signal: {stderr}"
    return proc, stderr, staging


class CtrlC(MergeEvents):
    """Presses Ctrl-C (a KeyboardInterrupt in the main thread, as Python's SIGINT handler raises
    it) once `after` units of the staging folder beside `out` are journaled."""

    def __init__(self, out: Path, after: int) -> None:
        self.out, self.after = out, after

    def on_progress(self, advance: int) -> None:
        journals = list(self.out.parent.glob(f".{self.out.name}.ri-merge-partial-*/{JOURNAL}"))
        if journals and len(journals[0].read_text().splitlines()) > self.after:
            raise KeyboardInterrupt
