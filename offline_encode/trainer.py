"""The batched multi-document LoRA trainer: the paper's per-document loop, n documents at a time.

Why it is exact. Step t trains example t of n documents at once; batch row i uses document i's own
A_i, B_i (stacked parameters ``[n, r, in]`` / ``[n, out, r]`` per target module, applied with
``torch.bmm`` from forward hooks on the frozen base model). The loss is ``sum_i mean_tokens(CE_i)``;
rows never interact in a causal LM, so dLoss/dA_i is exactly the gradient of document i's own loss,
and AdamW is element-wise, so each document follows the trajectory of training it alone
(``tests/test_trainer.py`` checks this against a plain PEFT loop).

Why it is fast. No padding to a fixed length: documents are sorted by (number of steps, total tokens)
before being grouped (so pass many more documents than ``docs_per_step`` to ``train`` for good
buckets), a step's rows are split into contiguous micro-batches that pad at most ``max_padding`` of
their tokens, and each micro-batch pads only to its own longest row (right padding, so no attention
mask is needed). Documents within a group are ordered by number of steps, so the documents still training
at step s are always a prefix of the group: the step uses the views ``A[:k]``, never an index gather.
Logits and cross-entropy are computed ``loss_chunk_tokens`` positions at a time under activation
checkpointing, so a 128k vocabulary never materialises more than one chunk of logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from offline_encode.config import EncodeConfig, lora_key
from offline_encode.device import resolve_device, resolve_dtype
from offline_encode.lora_math import adamw_update_, add_batched_lora, weighted_token_ce
from prag.errors import PragError
from prag.model_files import check_model_dir

Adapter = dict[str, Tensor]


def target_module_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the Linear modules a LoRA with ``targets`` would wrap (PEFT's suffix matching)."""
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    found: list[str] = []
    missing = []
    for target in targets:
        matches = [n for n in linear_names if n == target or n.endswith("." + target)]
        if not matches:
            missing.append(target)
        found.extend(matches)
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise PragError(f"LoRA target module(s) {missing} not found in the model; "
                        f"available Linear module names: {available}")
    order = {name: i for i, name in enumerate(linear_names)}
    return sorted(set(found), key=order.__getitem__)


def _linear_skeleton(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A module tree holding only the target Linear layers (uninitialised fp32 weights, same names and order).

    PEFT's random init depends only on the order and shapes of the wrapped layers, so initialising on
    this skeleton gives the same tensors as on the model, whatever the model's dtype or device, without
    touching the model or consuming its memory.
    """
    modules = dict(model.named_modules())
    root = nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        base = modules[name]
        parent.add_module(leaf, torch.nn.utils.skip_init(nn.Linear, base.in_features, base.out_features,
                                                         bias=False))
    return root


def make_init_adapter(model: nn.Module, cfg: EncodeConfig = EncodeConfig()) -> Adapter:
    """The one shared initial adapter: PEFT's LoRA init (A kaiming-uniform, B zeros) under ``init_seed``.

    Equal to reading the tensors of ``get_peft_model(model, LoraConfig(r, lora_alpha, target_modules,
    lora_dropout=0))`` built right after ``torch.manual_seed(cfg.init_seed)`` on an fp32 model; the global
    RNG state is left as it was.
    """
    from peft import LoraConfig, get_peft_model

    names = target_module_names(model, cfg.target_modules)
    skeleton = _linear_skeleton(model, names)
    lora_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                          lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        peft_model = get_peft_model(skeleton, lora_cfg)
    wrapped = dict(peft_model.base_model.model.named_modules())
    adapter: Adapter = {}
    for name in names:
        layer = wrapped[name]
        adapter[lora_key(name, "A")] = layer.lora_A["default"].weight.detach().to(torch.float32).clone()
        adapter[lora_key(name, "B")] = layer.lora_B["default"].weight.detach().to(torch.float32).clone()
    return adapter


def check_adapter(adapter: Adapter, model: nn.Module, names: Sequence[str], rank: int, what: str = "adapter") -> None:
    """Clear error when an adapter's keys or shapes do not fit the model and rank."""
    modules = dict(model.named_modules())
    expected = {lora_key(n, w) for n in names for w in "AB"}
    if set(adapter) != expected:
        extra, missing = sorted(set(adapter) - expected)[:3], sorted(expected - set(adapter))[:3]
        raise PragError(f"{what} does not match the model's LoRA targets: missing keys {missing}, "
                        f"unexpected keys {extra}")
    for name in names:
        lin = modules[name]
        for which, shape in (("A", (rank, lin.in_features)), ("B", (lin.out_features, rank))):
            got = tuple(adapter[lora_key(name, which)].shape)
            if got != shape:
                raise PragError(f"{what}: {lora_key(name, which)} has shape {list(got)}, expected {list(shape)} "
                                f"(rank {rank})")


def load_base_model(path: str | Path, device: torch.device, dtype: torch.dtype):
    """Frozen HF causal LM + tokenizer from a local directory (safetensors only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a local directory or a cached hub id (never a download); a truncated weight file or a missing
    # tokenizer is a named error, not a Rust traceback. Loading the resolved directory keeps
    # transformers off the network for a cached hub id.
    path = check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                                     attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise PragError(f"--model: cannot load a causal LM from {path}: {exc}") from None
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _rows_finite(tensors: Sequence[Tensor]) -> Tensor:
    """``[n]`` bools: whether row i of every ``[n, ...]`` tensor is all finite (one document per row)."""
    return torch.stack([torch.isfinite(t).flatten(1).all(1) for t in tensors]).all(0)


def _rows_sum_finite(tensors: Sequence[Tensor]) -> Tensor:
    """``_rows_finite`` for every training step, at half its cost: one sum per row, which a NaN or an inf
    makes non-finite (finite values could only overflow it near 1e38, i.e. when training diverged anyway)."""
    return torch.isfinite(torch.stack([t.flatten(1).sum(1, dtype=torch.float32) for t in tensors]).sum(0))


def split_by_padding(lengths: Sequence[int], max_padding: float) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` runs of rows whose padding to the run's longest row stays within
    ``max_padding`` (fraction of padded tokens). Rows arrive roughly longest first, so a few runs suffice;
    contiguous runs keep the adapters as views (``A[start:end]``), never a gather.
    """
    runs: list[tuple[int, int]] = []
    start, longest, real = 0, 0, 0
    for j, length in enumerate(lengths):
        new_longest = max(longest, length)
        if j > start and 1 - (real + length) / ((j - start + 1) * new_longest) > max_padding:
            runs.append((start, j))
            start, longest, real = j, length, length
        else:
            longest, real = new_longest, real + length
    runs.append((start, len(lengths)))
    return runs


DIVERGED_LOSS = "training diverged: non-finite loss or gradient (try a lower --lr)"
DIVERGED_WEIGHTS = "training diverged: non-finite adapter weights (try a lower --lr)"


@dataclass(frozen=True)
class DocFailure:
    """Why one document's adapter must not be stored: ``reason`` is stable (summaries count per reason),
    ``detail`` says where (e.g. the first bad step)."""

    reason: str
    detail: str = ""


@dataclass
class TrainStats:
    """What the last ``train`` call did; ``padding_fraction`` is pad tokens / tokens processed.

    ``failed`` maps the input index of every document whose loss, gradient or weights became non-finite
    to its ``DocFailure``; those documents' adapters are garbage and must be discarded.
    """

    docs: int = 0
    steps: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    failed: dict[int, DocFailure] = field(default_factory=dict)

    @property
    def padding_fraction(self) -> float:
        total = self.tokens + self.padded_tokens
        return self.padded_tokens / total if total else 0.0

    def to_dict(self) -> dict:
        return {"docs": self.docs, "steps": self.steps, "tokens": self.tokens, "padded_tokens": self.padded_tokens,
                "padding_fraction": self.padding_fraction, "seconds": self.seconds}


@dataclass
class _Active:
    """The adapters of the group being trained and the rows ``[lo, hi)`` of the current micro-batch."""

    a: dict[str, Tensor]
    b: dict[str, Tensor]
    lo: int = 0
    hi: int = 0


class BatchedLoraTrainer:
    """Loads the frozen base model once and trains one LoRA adapter per document, n documents per step."""

    def __init__(self, model_or_path, cfg: EncodeConfig = EncodeConfig(), init_adapter: Adapter | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.compute_dtype, self.device)
        self.tokenizer = None
        if isinstance(model_or_path, (str, Path)):
            self.model, self.tokenizer = load_base_model(model_or_path, self.device, self.dtype)
        else:
            self.model = model_or_path.to(device=self.device, dtype=self.dtype)
            self.model.eval()
            self.model.requires_grad_(False)
        if getattr(self.model.config, "final_logit_softcapping", None):
            raise PragError("models with final_logit_softcapping are not supported by the batched trainer")
        self.module_names = target_module_names(self.model, cfg.target_modules)
        if init_adapter is None:
            init_adapter = make_init_adapter(self.model, cfg)
        check_adapter(init_adapter, self.model, self.module_names, cfg.rank, "init adapter")
        self.init_adapter = {k: v.detach().to(torch.float32).cpu() for k, v in init_adapter.items()}
        self._decoder = getattr(self.model, self.model.base_model_prefix)
        self._lm_head = self.model.get_output_embeddings()
        self._pad_id = 0
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            self._pad_id = self.tokenizer.pad_token_id
        self._active: _Active | None = None
        modules = dict(self.model.named_modules())
        self._hooks = [modules[name].register_forward_hook(self._make_hook(name)) for name in self.module_names]
        self.last_stats = TrainStats()

    def _make_hook(self, name: str):
        scaling = self.cfg.scaling

        def hook(module, args, output):
            active = self._active
            if active is None:  # outside train(): the base model is untouched
                return None
            x = args[0]
            if x.dim() != 3 or x.shape[0] != active.hi - active.lo:
                raise PragError(f"{name}: expected a [rows, tokens, features] input with "
                                f"{active.hi - active.lo} rows, got shape {list(x.shape)}")
            a, b = active.a[name], active.b[name]
            if active.hi - active.lo < a.shape[0]:
                a, b = a[active.lo: active.hi], b[active.lo: active.hi]
            a, b = a.to(x.dtype), b.to(x.dtype)
            return add_batched_lora(output, x, a, b, scaling)

        return hook

    def close(self) -> None:
        """Remove the hooks (the model is then a plain base model again)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------ training
    def train(self, docs: Sequence[Sequence[Sequence[int]]], progress: bool = False,
              on_progress: Callable[[float], None] | None = None) -> list[Adapter]:
        """One adapter per document (each document = its list of token sequences), in input order.

        Returned tensors are CPU float32 in the key convention of ``offline_encode.config``. A document
        whose loss, gradient or weights became non-finite is listed in ``last_stats.failed`` (its tensors
        are still returned, for inspection, but must not be stored); the others are unaffected by it,
        since every document has its own rows and AdamW is element-wise.

        ``on_progress(docs)`` is called after every training step with the documents' worth of work that
        step did (each example is 1/len(its document's examples)), so a bar moves per step, not per group.
        """
        for i, seqs in enumerate(docs):
            if not seqs:
                raise PragError(f"document {i} has no training sequences")
            for j, seq in enumerate(seqs):
                if len(seq) < 2:
                    raise PragError(f"document {i}, sequence {j}: needs at least 2 tokens, got {len(seq)}")
        per_doc = [[list(s) for s in seqs] * self.cfg.epochs for seqs in docs]  # the paper: for epoch: for ex
        order = sorted(range(len(docs)), key=lambda i: (-len(per_doc[i]), -sum(map(len, per_doc[i])), i))
        n = max(1, self.cfg.docs_per_step)
        groups = [order[g:g + n] for g in range(0, len(order), n)]
        stats = TrainStats(docs=len(docs))
        start = time.perf_counter()
        results: list[Adapter | None] = [None] * len(docs)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(docs), desc="encode", unit="doc")
        report = on_progress if bar is None else (bar.update if on_progress is None else
                                                   lambda d: (bar.update(d), on_progress(d)))
        for group in groups:
            adapters, failures = self._train_group([per_doc[i] for i in group], stats, report)
            for i, adapter in zip(group, adapters):
                results[i] = adapter
            stats.failed.update({group[j]: failure for j, failure in failures.items()})
        if bar is not None:
            bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        return results  # type: ignore[return-value]

    def _train_group(self, examples: list[list[list[int]]], stats: TrainStats,
                     on_progress: Callable[[float], None] | None = None
                     ) -> tuple[list[Adapter], dict[int, DocFailure]]:
        """Train documents whose example lists are sorted by length, longest first; also returns the
        failures by position in ``examples``."""
        n, cfg = len(examples), self.cfg
        a = {m: self.init_adapter[lora_key(m, "A")].to(self.device).expand(n, -1, -1).clone().requires_grad_()
             for m in self.module_names}
        b = {m: self.init_adapter[lora_key(m, "B")].to(self.device).expand(n, -1, -1).clone().requires_grad_()
             for m in self.module_names}
        params = list(a.values()) + list(b.values())
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        self._active = _Active(a, b)
        losses: list[Tensor] = []
        # First step whose gradient was non-finite, per document (-1: none), kept on the device: no sync
        bad_step = torch.full((n,), -1, dtype=torch.long, device=self.device)
        try:
            for step in range(len(examples[0])):
                k = sum(1 for ex in examples if len(ex) > step)  # a prefix, because of the sort
                rows = [examples[i][step] for i in range(k)]
                step_loss = None
                # Gradients of different documents never mix, so a step may run as several micro-batches
                # (to avoid padding short rows to a long one) and still take one exact AdamW step.
                for lo, hi in split_by_padding([len(r) for r in rows], cfg.max_padding):
                    self._active.lo, self._active.hi = lo, hi
                    loss = self._loss(rows[lo:hi], stats)
                    loss.backward()
                    step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
                with torch.no_grad():
                    live = slice(0, k)  # the documents still training: a prefix, so views, no gather
                    # A non-finite loss of document i makes only its own rows' gradients non-finite
                    newly_bad = ~_rows_sum_finite([p.grad[live] for p in params]) & (bad_step[live] < 0)
                    bad_step[live] = torch.where(newly_bad, step + 1, bad_step[live])
                    adamw_update_([p[live] for p in params], [p.grad[live] for p in params],
                                  [m[live] for m in exp_avgs], [v[live] for v in exp_avg_sqs], step + 1,
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
                for p in params:
                    p.grad = None
                stats.steps += 1
                losses.append(step_loss)
                if on_progress is not None:  # host-side arithmetic on known lengths: no device sync
                    on_progress(sum(1.0 / len(examples[i]) for i in range(k)))
        finally:
            self._active = None
        stats.losses.extend(torch.stack(losses).tolist() if losses else [])  # one device sync per group
        host = {}  # one device-to-host copy per stacked tensor, not one per document
        for m in self.module_names:
            host[lora_key(m, "A")] = a[m].detach().to("cpu", torch.float32)
            host[lora_key(m, "B")] = b[m].detach().to("cpu", torch.float32)
        failures: dict[int, DocFailure] = {}
        weights_ok = _rows_finite(list(host.values())).tolist()
        for i, (first_bad, ok) in enumerate(zip(bad_step.tolist(), weights_ok)):
            if first_bad > 0:
                failures[i] = DocFailure(DIVERGED_LOSS, f"from step {first_bad} of {len(examples[i])}")
            elif not ok:
                failures[i] = DocFailure(DIVERGED_WEIGHTS, f"after {len(examples[i])} steps")
        return [{key: t[i].clone() for key, t in host.items()} for i in range(n)], failures

    def _loss(self, rows: list[list[int]], stats: TrainStats) -> Tensor:
        """``sum_rows mean_tokens(CE)`` over right-padded rows, logits computed chunk by chunk.

        Indices of the real (non-pad) predicted positions are built on the host from the known
        lengths, so the step never waits for the device.
        """
        lengths = [len(r) for r in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        positions, weights = [], []
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            positions.append(torch.arange(i * width, i * width + len(row) - 1))
            weights.append(torch.full((len(row) - 1,), 1.0 / (len(row) - 1), dtype=torch.float32))
        stats.tokens += sum(lengths)
        stats.padded_tokens += len(rows) * width - sum(lengths)
        non_blocking = self.device.type == "cuda"
        pos = torch.cat(positions)
        targets = ids.view(-1)[pos + 1].to(self.device, non_blocking=non_blocking)
        pos = pos.to(self.device, non_blocking=non_blocking)
        weight = torch.cat(weights).to(self.device, non_blocking=non_blocking)
        ids = ids.to(self.device, non_blocking=non_blocking)
        # Right padding + causal attention: real positions never see the pads, so no mask is needed.
        hidden = self._decoder(input_ids=ids, use_cache=False).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos)
        lm_weight = self._lm_head.weight
        chunk = max(1, self.cfg.loss_chunk_tokens)
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], chunk):
            e = s + chunk
            total = total + checkpoint(weighted_token_ce, h[s:e], lm_weight, targets[s:e], weight[s:e],
                                       use_reentrant=False)
        return total
