"""Training memory per device, counted from the tensors alive at the peak.

Three moments compete for the peak of a training step, in the order Lightning
runs it (its closure calls ``training_step``, then ``zero_grad`` with
``set_to_none=True``, then backward; the optimizer's update follows):

* ``forward``: the end of the forward, in the loss. Parameters, optimizer state,
  **the previous step's gradients** (Lightning frees them only after
  ``training_step`` returns; DeepSpeed's engine frees them in its step), every
  saved activation, the logits and, while ``cross_entropy`` runs, its fp32 copy
  (under autocast) and the log-probs.
* ``forward_backward``: the start of backward. Parameters, optimizer state,
  every saved activation of every layer, the logits and their gradients
  (``cross_entropy`` = log_softmax + nll: three ``B*T*V`` fp32 tensors are
  alive in its backward), and the 16-bit weight copies autocast keeps for
  backward. Gradients exist here only when accumulating (micro-batch 2+).
* ``optimizer_step``: parameters, full gradients, optimizer state, and the
  optimizer's temporaries (foreach AdamW materialises ``sqrt(v)`` for all
  parameters at once; fused has none; the for-loop one param at a time).

Each phase is an itemised dict whose parts sum to its ``total``; the peak is
the larger phase. Activation bytes per layer follow Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models"), but are
counted for this layout (pre-norm, fp32 residual under autocast, flash SDPA).

A ``torch.compile``d step (``TrainSetup.compile``) saves another set: what
inductor's min-cut partitioner keeps, read off fake-tensor traces of the
compiled step (:func:`compiled_activation_bytes`); it is modelled for GPT-2-style
blocks only (:func:`compiled_unsupported` says why not otherwise).
"""

from __future__ import annotations

from collections.abc import Callable

from dataclasses import asdict, dataclass

from ..validate import one_of, positive_int
from .params import count_params, layer_params, matmul_params
from .precision import OPTIMIZER_IMPLS, STRATEGIES, Precision, optimizer_states_per_param, precision
from .shapes import ModelShape

FP32 = 4


@dataclass(frozen=True)
class TrainSetup:
    """How the model is trained (everything the memory and FLOPs forecasts need beyond the shape)."""

    micro_batch_size: int = 1  # per device
    seq_len: int | None = None  # None: the shape's n_ctx
    grad_accum: int = 1
    devices: int = 1  # per node
    num_nodes: int = 1
    precision: str = "32-true"
    optimizer: str = "adamw"
    momentum: float = 0.0  # SGD only
    optimizer_impl: str = "foreach"  # "foreach" (torch's CUDA default) | "fused" | "for-loop"
    strategy: str = "ddp"
    flash_attention: bool = True
    keep_logits: bool = False  # the training step holds the logits through backward (nanoGPT's train.py does)
    activation_checkpointing: bool = False
    compile: bool = False  # the training step is torch.compile'd (inductor): the compiled partition's activations

    def __post_init__(self) -> None:
        for field in ("micro_batch_size", "grad_accum", "devices", "num_nodes"):
            positive_int(field, getattr(self, field))
        positive_int("seq_len", self.seq_len, optional=True)
        precision(self.precision)
        optimizer_states_per_param(self.optimizer, self.momentum)
        one_of("optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        one_of("strategy", self.strategy, STRATEGIES)

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def prec(self) -> Precision:
        return precision(self.precision)

    def seq(self, shape: ModelShape) -> int:
        return self.seq_len or shape.n_ctx

    def to_dict(self) -> dict:
        return asdict(self)


def layer_activation_bytes(shape: ModelShape, batch: int, seq: int, prec: Precision, flash: bool = True) -> dict[str, int]:
    """Bytes saved for backward by one transformer block, itemised."""
    BT = batch * seq
    a, r = prec.compute_bytes, prec.residual_bytes
    stats = (2 if shape.norm == "layernorm" else 1) * FP32 * BT  # mean/rstd per token
    out = {
        "attention/norm_input": r * BT * shape.d_model + stats,
        "attention/qkv_input": a * BT * shape.d_model,
        "attention/q_k_v": a * BT * (shape.q_dim + 2 * shape.kv_dim),
        # the projection's input; with flash attention also SDPA's saved output (the same storage) + logsumexp
        "attention/output": a * BT * shape.q_dim + (FP32 * batch * shape.n_head * seq if flash else 0),
        "mlp/norm_input": r * BT * shape.d_model + stats,
        "mlp/fc_input": a * BT * shape.d_model,
    }
    if shape.kv_heads != shape.n_head:  # k, v repeated to every query head before SDPA
        out["attention/q_k_v"] += a * BT * 2 * (shape.q_dim - shape.kv_dim)
    if shape.mlp == "gated":  # gate, silu(gate), up, product
        out["mlp/hidden"] = 4 * a * BT * shape.mlp_hidden
    else:  # fc output (gelu input), gelu output
        out["mlp/hidden"] = 2 * a * BT * shape.mlp_hidden
    if not flash:  # softmax output (fp32 under autocast) + its 16-bit copy for att @ v
        scores = batch * shape.n_head * seq * seq
        out["attention/scores"] = (FP32 + a) * scores if prec.autocast else a * scores
    out["total"] = sum(out.values())
    return out


def head_activation_bytes(shape: ModelShape, batch: int, seq: int, prec: Precision,
                          keep_logits: bool = False) -> dict[str, int]:
    """Final norm, head input and the logits' peak (cross-entropy backward); ``keep_logits``: the training
    code holds the logits through backward (nanoGPT's ``logits, loss = model(X, Y)``)."""
    BT = batch * seq
    a, r = prec.compute_bytes, prec.residual_bytes
    loss_bytes = FP32 if prec.autocast or prec.param_bytes == FP32 else a
    out = {
        "final_norm_input": r * BT * shape.d_model,
        "head_input": a * BT * shape.d_model,
        # log-probs saved by log_softmax, d(log-probs) from nll_loss, d(logits) from log_softmax
        "logits_and_grads": 3 * loss_bytes * BT * shape.vocab_size,
        "logits_kept": a * BT * shape.vocab_size if keep_logits else 0,
    }
    out["total"] = sum(out.values())
    return out


def compiled_unsupported(shape: ModelShape, setup: TrainSetup) -> str | None:
    """Why the analytic compiled model does not apply to this shape and setup (None: it does)."""
    gpt2 = (shape.norm == "layernorm" and shape.norm_bias and shape.mlp == "gelu" and shape.bias
            and shape.mlp_hidden == 4 * shape.d_model and shape.kv_heads == shape.n_head and shape.learned_pos
            and shape.tied and shape.hd * shape.n_head == shape.d_model)
    if not gpt2:
        return (f"{shape.name} is not a GPT-2-style block (LayerNorm with bias, GELU MLP with d_mlp = 4 x d_model, "
                "one KV head per head, learned positions, tied head)")
    if setup.prec.param_bytes != FP32:
        return f"precision {setup.precision} (16-bit parameters) was not traced compiled"
    if setup.strategy != "ddp":
        return f"strategy {setup.strategy}: the compiled partition was traced on one device (ddp) only"
    if setup.activation_checkpointing or not setup.flash_attention:
        return "activation checkpointing and materialised attention were not traced compiled"
    return None


def compiled_activation_bytes(shape: ModelShape, setup: TrainSetup, batch: int | None = None,
                              n_params: int | None = None) -> dict[str, int]:
    """What a ``torch.compile``d (inductor) training step adds to the model state at its forward-backward peak,
    itemised (``total`` = the larger of ``at_backward_start`` and ``at_backward_end``).

    Modelled, not traced: read off fake-tensor traces of the compiled step of
    :class:`budget_callback.models.gpt.GPT` (torch 2.13, CPU inductor, default mode, the whole training step
    compiled, the loss inside) and checked against traces of other sizes. Saved for the backward (the
    min-cut partitioner's choice), per layer: both LayerNorms' normalised inputs (residual dtype), outputs
    (compute dtype) and rstd (fp32); q, k, v; the SDPA output and its fp32 log-sum-exp; the MLP's pre-GELU and
    GELU outputs; under autocast the 16-bit copies of the four weight matrices (in fp32 they are views). Once:
    ln_f the same way, the logits, the log-softmax's row max and log-sum-exp, the head's 16-bit copy, the
    positions, two scalars; from micro-batch 3 on, the first LayerNorm keeps the embeddings, mean and rstd
    instead (the partitioner's choice depends on the micro-batch). The attention output, the residual stream
    and the activation gradients are not saved.

    The forward ends with all of that alive and the loss kernels' scratch (16 bytes per row; in Lightning's order
    the previous step's gradients too, counted by the caller). Then the backward: at its start the head's weight
    gradient (compute dtype) joins everything saved, or
    (full precision) the top MLP's input gradient and a weight gradient; ``keep_logits`` (the compiled graph
    returns the logits, e.g. nanoGPT's ``logits, loss = model(X, Y)``) adds their zero tangent and a separate
    logits gradient. At its end every gradient exists, with a second full gradient of the tied matrix
    (head and embedding, summed last), the embedding output's gradient, the head's and a layer's 16-bit
    copies (in full precision the logits buffer instead, which inductor keeps for reuse).

    Checked against compiled traces (bf16-mixed and 32-true, micro-batch 1 to 16, V 10,000 to 50,257, D 64 to
    768, 1 to 12 layers, GPT-2 small included): the forward-backward peak within 0.5%.
    """
    B = setup.micro_batch_size if batch is None else batch
    T, D, V, H = setup.seq(shape), shape.d_model, shape.vocab_size, shape.n_head
    prec = setup.prec
    c, r, p, rows = prec.compute_bytes, prec.residual_bytes, prec.param_bytes, B * setup.seq(shape)
    F = shape.mlp_hidden
    copy = c if prec.autocast else 0
    layer = {
        "layer/norm_normalised": 2 * rows * D * r,
        "layer/norm_out": 2 * rows * D * c,
        "layer/norm_rstd": 2 * rows * FP32,
        "layer/q_k_v": 3 * rows * D * c,
        "layer/attention_out": rows * D * c + FP32 * B * H * T,
        "layer/mlp_hidden": 2 * rows * F * c,
        "layer/weight_copies": (4 * D * D + 2 * D * F) * copy,
    }
    saved = {f"saved/{k}": shape.n_layer * v for k, v in layer.items()}
    saved.update({
        "saved/positions": 8 * T,
        "saved/final_norm": rows * D * (r + c) + FP32 * rows,
        "saved/logits": rows * V * c,
        "saved/log_softmax_stats": 2 * FP32 * rows,
        "saved/head_weight_copy": V * D * copy,
        "saved/scalars": 2 * FP32,
        "saved/first_norm_variant": (T * D * p + FP32 * rows) if B >= 3 else 0,
    })
    n = count_params(shape)["total"] if n_params is None else n_params
    grads = p * n
    tangent = 2 * rows * V * c if setup.keep_logits else 0
    start = V * D * c if prec.autocast else rows * F * FP32 + rows * D * FP32 + D * F * FP32
    end = V * D * p + rows * D * r + (V * D * c if prec.autocast else rows * V * c) + layer["layer/weight_copies"]
    out = dict(saved)
    out["saved"] = sum(saved.values())
    out["at_forward_end"] = out["saved"] + 16 * rows + 8  # the loss kernels' per-row scratch
    out["at_backward_start"] = out["saved"] + (tangent if setup.keep_logits else start)
    out["at_backward_end"] = grads + end
    out["total"] = max(out["at_backward_start"], out["at_backward_end"])
    return out


def activation_bytes(shape: ModelShape, setup: TrainSetup, batch: int | None = None) -> dict[str, int]:
    """All activations alive at the start of backward for one micro-batch, itemised (a compiled step:
    :func:`compiled_activation_bytes`, whose total is its forward-backward peak beyond the model state)."""
    if setup.compile:
        return compiled_activation_bytes(shape, setup, batch)
    B = setup.micro_batch_size if batch is None else batch
    T = setup.seq(shape)
    prec = setup.prec
    layer = layer_activation_bytes(shape, B, T, prec, setup.flash_attention)["total"]
    head = head_activation_bytes(shape, B, T, prec, setup.keep_logits)
    if setup.activation_checkpointing:
        # each block keeps only its input (the first one's is the embedding output); one is recomputed at a time
        layers = shape.n_layer * prec.residual_bytes * B * T * shape.d_model + layer
    else:
        layers = shape.n_layer * layer
    out = {  # the embedding output is the first block's norm input: counted there, once
        "layers": layers,
        "head": head["final_norm_input"] + head["head_input"],
        "logits": head["logits_and_grads"] + head["logits_kept"],
    }
    out["total"] = sum(out.values())
    return out


def forward_activation_bytes(shape: ModelShape, setup: TrainSetup, batch: int | None = None) -> int:
    """Activations alive at the forward's own peak (in the loss): everything saved for backward, the logits, and
    while ``cross_entropy`` runs its fp32 copy of the logits (under autocast) and the log-probs. A compiled step
    (:func:`compiled_activation_bytes`): what it saves, then its loss kernels' output."""
    B = setup.micro_batch_size if batch is None else batch
    BT, V, prec = B * setup.seq(shape), shape.vocab_size, setup.prec
    if setup.compile:
        return compiled_activation_bytes(shape, setup, batch)["at_forward_end"]
    acts = activation_bytes(shape, setup, batch)
    loss_bytes = FP32 if prec.autocast or prec.param_bytes == FP32 else prec.compute_bytes
    logits = prec.compute_bytes * BT * V + (FP32 * BT * V if prec.autocast else 0) + loss_bytes * BT * V
    return acts["layers"] + acts["head"] + logits


def structure_shape(found: dict, seq_len: int) -> ModelShape | None:
    """A transformer shape for a module whose step could not be traced, from what was found in it: its stack of
    identical blocks (``layers``, ``layer_params``), W's width and vocabulary. Chosen to err high: the MLP is
    taken as gated (its saved activations are the larger for the same parameters) and given every parameter of
    a block beyond the smallest attention (2 D x D, multi-query), with LayerNorms (two statistics per row).
    None when no stack of blocks was found (the memory is then unknown)."""
    L, per, D, V = (found.get(k) for k in ("layers", "layer_params", "hidden_dim", "vocab_size"))
    if not (L and per and D and V):
        return None
    d_mlp = max(D, -(-(per - 2 * D * D) // (3 * D)))
    return ModelShape(vocab_size=V, d_model=D, n_layer=L, n_head=1, d_mlp=d_mlp, n_ctx=max(1, seq_len),
                      mlp="gated", learned_pos=False, tied=bool(found.get("tied")),
                      name=str(found.get("name", "custom")))


ESTIMATE_MARGIN = 0.10  # added to the activations of a step estimated from its structure, not traced


def with_activation_margin(memory: dict, margin: float = ESTIMATE_MARGIN) -> dict:
    """A :func:`peak_memory` result with every phase's activations raised by ``margin`` (an estimate errs high)."""
    phases = {name: {k: v for k, v in phase.items() if k != "total"} for name, phase in memory["phases"].items()}
    for phase in phases.values():
        phase["activations"] += int(phase["activations"] * margin)
        phase["total"] = sum(phase.values())
    return _at_peak(phases)


def _model_state(shape: ModelShape, setup: TrainSetup, n_params: int) -> dict[str, int]:
    """Bytes per device of parameters, gradients, optimizer state and optimizer temporaries."""
    prec, W, strategy = setup.prec, setup.world_size, setup.strategy
    states = optimizer_states_per_param(setup.optimizer, setup.momentum)
    p = prec.param_bytes
    if strategy.startswith("deepspeed"):
        stage = int(strategy[-1])
        # ZeRO (Rajbhandari et al. 2020): 16-bit params and grads, fp32 master + moments in the optimizer
        weights = prec.compute_bytes if prec.autocast else p
        master = FP32 if weights != FP32 else 0
        params = weights * n_params // (W if stage >= 3 else 1)
        grads = weights * n_params // (W if stage >= 2 else 1)
        optimizer = (master + states * FP32 if weights != FP32 else states * p) * n_params // W
        temporaries = 0  # DeepSpeed's fused Adam
        return {"params": params, "gradients": grads, "optimizer": optimizer, "temporaries": temporaries}
    shard = W if strategy == "fsdp" else 1
    params = p * n_params // shard
    grads = p * n_params // shard
    optimizer = states * p * n_params // shard
    if states == 0 or setup.optimizer_impl == "fused":
        temporaries = 0
    elif setup.optimizer_impl == "foreach":
        temporaries = p * n_params // shard  # sqrt(exp_avg_sq) (or the momentum update) for all params
    else:
        temporaries = 2 * p * max(shape.vocab_size * shape.d_model, shape.d_model * shape.mlp_hidden * 2)
    return {"params": params, "gradients": grads, "optimizer": optimizer, "temporaries": temporaries}


def _extras(shape: ModelShape, setup: TrainSetup, n_params: int) -> dict[str, int]:
    """Buffers the strategy or precision adds during forward/backward."""
    prec, W, strategy = setup.prec, setup.world_size, setup.strategy
    out = {}
    if prec.autocast and strategy == "ddp":  # FSDP and DeepSpeed gather 16-bit weights instead
        out["autocast_weight_copies"] = prec.compute_bytes * matmul_params(shape)
    if strategy == "ddp" and W > 1:
        out["ddp_gradient_buckets"] = prec.param_bytes * n_params  # gradient_as_bucket_view=False
    if strategy == "fsdp":
        # blocks wrapped as FSDP units: root unit (embeddings, head) + current and prefetched block,
        # gathered in the compute dtype, and one block's unsharded gradient before reduce-scatter
        block = layer_params(shape)
        root = n_params - shape.n_layer * block
        out["fsdp_gathered_params"] = prec.compute_bytes * (root + 3 * block)
    if strategy == "deepspeed_stage_3":
        block = layer_params(shape)
        out["zero3_gathered_params"] = prec.compute_bytes * 2 * block
    return out


def memory_phases(shape: ModelShape, setup: TrainSetup, n_params: int | None = None, batch: int | None = None,
                  activations_total: int | None = None, capture_bytes: int = 0) -> dict[str, dict[str, int]]:
    """The candidate peaks, itemised. ``activations_total`` overrides the analytic figure (a traced one).

    ``capture_bytes``: what taking a snapshot allocates on the device right after the optimizer step
    (a sharded W gathered whole, its cast to the snapshot dtype); a third phase when non-zero.
    """
    n = count_params(shape)["total"] if n_params is None else n_params
    state = _model_state(shape, setup, n)
    if activations_total is not None:
        acts = activations_total
    elif setup.compile:
        acts = compiled_activation_bytes(shape, setup, batch, n)["total"]
    else:
        acts = activation_bytes(shape, setup, batch)["total"]
    extras = _extras(shape, setup, n)
    if activations_total is not None or setup.compile:  # a traced or compiled figure holds the autocast copies
        extras.pop("autocast_weight_copies", None)
    forward = {  # Lightning zeroes the gradients after training_step: the previous step's are alive
        "params": state["params"],
        "gradients": 0 if setup.strategy.startswith("deepspeed") else state["gradients"],
        "optimizer": state["optimizer"],
        "activations": acts if activations_total is not None else forward_activation_bytes(shape, setup, batch),
        "other": sum(extras.values()),
    }
    fb = {
        "params": state["params"],
        "gradients": state["gradients"] if setup.grad_accum > 1 else 0,
        "optimizer": state["optimizer"],
        "activations": acts,
        "other": sum(extras.values()),
    }
    step = {
        "params": state["params"],
        "gradients": state["gradients"],
        "optimizer": state["optimizer"] + state["temporaries"],
        "activations": 0,
        "other": extras.get("ddp_gradient_buckets", 0),
    }
    return _phases({"forward": forward, "forward_backward": fb}, step, state["optimizer"], capture_bytes)


def _phases(passes: dict[str, dict[str, int]], step: dict[str, int], optimizer_state: int,
            capture_bytes: int) -> dict:
    """The phases with their totals: the forward and backward ones (``passes``), the optimizer step, and the
    snapshot phase (after the optimizer step, its temporaries freed: model state + what the capture allocates)
    only when a snapshot allocates on the device."""
    phases = {**passes, "optimizer_step": step}
    if capture_bytes:
        phases["snapshot_capture"] = {"params": step["params"], "gradients": step["gradients"],
                                      "optimizer": optimizer_state, "activations": 0,
                                      "other": step["other"] + capture_bytes}
    for phase in phases.values():
        phase["total"] = sum(phase.values())
    return phases


def _at_peak(phases: dict) -> dict:
    name = max(phases, key=lambda k: phases[k]["total"])
    at_peak = phases[name]
    return {
        "peak_bytes": at_peak["total"], "peak_phase": name, "params_bytes": at_peak["params"],
        "gradients_bytes": at_peak["gradients"], "optimizer_bytes": at_peak["optimizer"],
        "activations_bytes": at_peak["activations"], "other_bytes": at_peak["other"], "phases": phases,
    }


def peak_memory(shape: ModelShape, setup: TrainSetup, n_params: int | None = None, batch: int | None = None,
                activations_total: int | None = None, capture_bytes: int = 0) -> dict:
    """Peak bytes per device and the itemised tensors alive at that moment."""
    return _at_peak(memory_phases(shape, setup, n_params, batch, activations_total, capture_bytes))


def _largest(fits, limit: int) -> int | None:
    """Largest n in [1, limit] with fits(n) (monotone); None if not even 1 fits."""
    if not fits(1):
        return None
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _fewest(fits, strategy: str, limit: int) -> int | None:
    """Fewest n in [1, limit] with fits(n) (monotone); under DDP more devices never help."""
    if fits(1):
        return 1
    if strategy == "ddp" or not fits(limit):
        return None
    lo, hi = 1, 2
    while not fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def max_batch_size(shape: ModelShape, setup: TrainSetup, budget_bytes: int, n_params: int | None = None,
                   limit: int = 1 << 20, capture_bytes: int = 0) -> int | None:
    """Largest micro-batch whose peak fits ``budget_bytes``; ``None`` if not even 1 fits."""
    def fits(b: int) -> bool:
        return peak_memory(shape, setup, n_params, batch=b, capture_bytes=capture_bytes)["peak_bytes"] <= budget_bytes
    return _largest(fits, limit)


def min_devices(shape: ModelShape, setup: TrainSetup, budget_bytes: int, n_params: int | None = None,
                limit: int = 65_536, capture_bytes: int = 0) -> int | None:
    """Fewest devices of ``budget_bytes`` each that fit one step under the strategy; ``None`` if none do.

    Under DDP every device holds everything, so more devices never help.
    """
    from dataclasses import replace

    def fits(world: int) -> bool:
        trial = replace(setup, devices=world, num_nodes=1)
        return peak_memory(shape, trial, n_params, capture_bytes=capture_bytes)["peak_bytes"] <= budget_bytes
    return _fewest(fits, setup.strategy, limit)


@dataclass(frozen=True)
class ShardedModel:
    """What one device holds of an FSDP2 (``fully_shard``) model, read off the sharded module: its shards, and
    the units' parameters gathered whole (bytes, in the dtype they are gathered in)."""

    local_params_bytes: int  # this device's parameter shards as allocated (dim 0 padded to the world)
    local_numel: int  # elements of this device's shards (its gradients and optimizer state follow them)
    full_numel: int  # elements of the whole model
    root_unit_bytes: int  # the root unit's parameters: gathered from the forward's start to the backward's end
    largest_unit_bytes: int  # the largest block (gathered around its own forward and backward)
    units: int = 1

    full_params_bytes: int = 0  # the whole model's parameters (for another world size)
    world_size: int = 1

    def share(self, full_bytes: int) -> int:
        """This device's share of a tensor set that follows the parameters' sharding (gradients, state)."""
        return full_bytes * self.local_numel // max(1, self.full_numel)

    def at_world(self, world_size: int) -> ShardedModel:
        """The same model sharded over ``world_size`` devices (shards of 1/world each, padding aside)."""
        if world_size == self.world_size or not self.full_params_bytes:
            return self
        from dataclasses import replace

        return replace(self, local_params_bytes=-(-self.full_params_bytes // world_size),
                       local_numel=-(-self.full_numel // world_size), world_size=world_size)


# trace phase -> memory phase: the forward (the previous step's gradients alive), the start of backward, and
# with accumulation a later micro-batch's forward and backward (the gradients alive in both)
_TRACE_PASSES = {"forward": "forward", "backward": "forward_backward", "accumulate_forward": "accumulate_forward",
                 "accumulate_backward": "accumulate_backward"}


def peak_memory_from_trace(trace: dict, setup: TrainSetup, capture_bytes: int = 0,
                           sharded: ShardedModel | None = None) -> dict:
    """The :func:`peak_memory` result for a module whose step was traced with fake tensors.

    ``trace`` is :func:`budget_callback.lightning.tracing.trace_training_step_memory`'s
    result (one device, tensors as the step creates them, in Lightning's step order). DDP adds its gradient
    buckets; sharded strategies divide the model state and the gradients alive by the world size; DeepSpeed's
    engine frees the gradients in its step, so none are alive in the next forward. ``sharded`` (an FSDP2 model,
    traced unsharded): this device's shards, and the units gathered whole in each phase (``other``).
    """
    if sharded is not None:
        return _fsdp2_from_trace(trace, sharded, capture_bytes)
    W = setup.world_size
    shard = W if setup.strategy != "ddp" else 1
    params = (trace["params_bytes"] + trace["buffers_bytes"]) // shard
    grads = trace["gradients_bytes"] // shard
    opt = trace["optimizer_state_bytes"] // shard
    buckets = trace["gradients_bytes"] if setup.strategy == "ddp" and W > 1 else 0
    deepspeed = setup.strategy.startswith("deepspeed")
    passes = _passes(trace, params, opt, buckets,
                     lambda key, alive: 0 if key == "forward" and deepspeed else alive // shard)
    persistent = trace["params_bytes"] + trace["buffers_bytes"] + trace["optimizer_state_bytes"]
    step_temporaries = max(0, trace["optimizer_peak_bytes"] - persistent - trace["gradients_bytes"]) // shard
    step = {"params": params, "gradients": grads, "optimizer": opt + step_temporaries, "activations": 0, "other": buckets}
    return _at_peak(_phases(passes, step, opt, capture_bytes))


def _passes(trace: dict, params: int, opt: int, other: int, gradients) -> dict[str, dict[str, int]]:
    """The forward and backward moments of a traced step on one device: its parameters, optimizer state and
    ``other`` as given, ``gradients(phase, alive)`` of the (unsharded) gradients alive as each phase starts, and
    the activations: the phase's peak beyond everything persistent and those gradients."""
    persistent = trace["params_bytes"] + trace["buffers_bytes"] + trace["optimizer_state_bytes"]
    passes = {}
    for key, name in _TRACE_PASSES.items():
        if f"{key}_peak_bytes" not in trace or (key == "backward" and not trace[f"{key}_peak_bytes"]):
            continue
        alive = trace.get(f"{key}_gradients_bytes", 0)
        passes[name] = {"params": params, "gradients": gradients(key, alive), "optimizer": opt,
                        "activations": trace[f"{key}_peak_bytes"] - persistent - alive, "other": other}
    return passes


def _fsdp2_from_trace(trace: dict, sharded: ShardedModel, capture_bytes: int) -> dict:
    """Per device under FSDP2: the unsharded trace's activations, this device's shards of the parameters,
    gradients and optimizer state, and what is gathered whole: the root unit, from the forward's start to the
    backward's end. (Later in the backward a block is gathered and the next prefetched, while the gradients
    already computed are sharded: the unsharded trace holds them whole there, which is more.)"""
    params = sharded.local_params_bytes + trace["buffers_bytes"]
    opt = sharded.share(trace["optimizer_state_bytes"])
    persistent = trace["params_bytes"] + trace["buffers_bytes"] + trace["optimizer_state_bytes"]
    passes = _passes(trace, params, opt, sharded.root_unit_bytes, lambda key, alive: sharded.share(alive))
    temporaries = sharded.share(max(0, trace["optimizer_peak_bytes"] - persistent - trace["gradients_bytes"]))
    step = {"params": params, "gradients": sharded.share(trace["gradients_bytes"]), "optimizer": opt + temporaries,
            "activations": 0, "other": 0}
    return _at_peak(_phases(passes, step, opt, capture_bytes))


def trace_at_batch(trace: dict, per_sample: dict[str, int], batch_from: int, batch: int) -> dict:
    """A traced step at another micro-batch: every byte figure moves by its per-sample slope."""
    return {k: v + per_sample.get(k, 0) * (batch - batch_from) if isinstance(v, int) else v for k, v in trace.items()}


def trace_at_blocks(low: dict, high: dict, blocks: int, at: tuple[int, int] = (1, 2)) -> dict:
    """A traced step at ``blocks`` identical blocks from traces of the same model cut to ``at[0]`` and ``at[1]``
    blocks: every byte and FLOP figure on the line through them. Where the traces carry the peak of each part of
    a pass (``segments``: before the stack, its bottom and top blocks, after it; see
    ``lightning.tracing.TraceSession._segment_hooks``), each part is on its line and a pass's peak is the
    largest of them there: memory moves linearly through identical blocks, so the peak of a deeper stack may sit
    in another part than it did in a shallow one (a backward whose gradients outgrow the activations it frees
    peaks at its end, not its start), and each part's line finds it."""
    a, b = at

    def line(x: int, y: int) -> int:
        return x + (blocks - a) * (y - x) // (b - a)
    out = {k: (line(low[k], v) if isinstance(v, int) and isinstance(low.get(k), int) else v) for k, v in high.items()}
    if isinstance(low.get("segments"), dict) and isinstance(high.get("segments"), dict):
        segments = {k: line(low["segments"][k], v) for k, v in high["segments"].items() if k in low["segments"]}
        out["segments"] = segments
        for phase in {k.split("/")[0] for k in segments}:
            out[f"{phase}_peak_bytes"] = max(v for k, v in segments.items() if k.split("/")[0] == phase)
    phases = {k.removesuffix("_peak_bytes"): v for k, v in out.items() if k.endswith("_peak_bytes") and k != "peak_bytes"}
    out["peak_phase"] = max(phases, key=phases.get)
    out["peak_bytes"] = phases[out["peak_phase"]]
    parts = ("params_bytes", "buffers_bytes", "gradients_bytes", "optimizer_state_bytes", "batch_bytes")
    out["activations_bytes"] = out["peak_bytes"] - sum(out[k] for k in parts)
    return out


def max_batch_size_traced(trace: dict, per_sample: dict[str, int], batch_from: int, setup: TrainSetup,
                          budget_bytes: int, capture_bytes: int = 0, limit: int = 1 << 20,
                          exact: dict[int, dict] | None = None, sharded: ShardedModel | None = None,
                          retrace: Callable[[int], dict] | None = None) -> int | None:
    """Largest micro-batch whose traced peak fits ``budget_bytes``. ``exact``: traces at other micro-batches,
    taken as they are there (a compiled step is on its line only from 3 on, so the line starts at 3 or more and
    the run's own is exact).

    Without ``retrace``, on the line through ``trace`` at ``batch_from``. A phase's peak is the largest of its
    moments, each linear in the batch: the line through two nearby micro-batches bends up further out (another
    moment takes over the peak) and the line alone can name a micro-batch that does not fit (Lightning's demo
    Transformer: 351 on the line at 4 GiB, 256 traced). With ``retrace(b)`` (the step traced at micro-batch b)
    the line only gives the first guess: the answer is the largest micro-batch whose own trace fits and the next
    one's does not, found between traced micro-batches (a secant between a traced one that fits and one that
    does not lies above the peaks between them, so its guesses fit; usually two or three traces)."""
    def peak(at: dict) -> int:
        return peak_memory_from_trace(at, setup, capture_bytes, sharded)["peak_bytes"]

    def on_line(b: int) -> bool:
        return peak((exact or {}).get(b) or trace_at_batch(trace, per_sample, batch_from, b)) <= budget_bytes
    guess = _largest(on_line, limit)
    if retrace is None:
        return guess
    traced = {batch_from: peak(trace), **{b: peak(t) for b, t in (exact or {}).items()}}

    def at(b: int) -> int:
        if b not in traced:
            try:
                traced[b] = peak(retrace(b))
            except Exception as err:  # noqa: BLE001 - a step that cannot run at b (a table sized for less)
                raise _NotTraced from err
        return traced[b]
    try:
        return _largest_traced(at, budget_bytes, guess or 1, limit)
    except _NotTraced:  # the largest micro-batch known to fit, traced: never one that was not
        fitting = [b for b, v in traced.items() if v <= budget_bytes]
        return max(fitting) if fitting else None


class _NotTraced(Exception):
    """The step could not be traced at a micro-batch the search asked for."""


def _largest_traced(at: Callable[[int], int], budget: int, guess: int, limit: int, rounds: int = 24) -> int | None:
    """Largest b in [1, limit] with at(b) <= budget, ``at`` convex and rising in b: brackets (fits, does not)
    from ``guess`` outwards, then closed by secant guesses (bisection where a secant does not help)."""
    guess = max(1, min(guess, limit))
    if at(guess) <= budget:
        lo, hi, step = guess, guess + 1, 1
        while hi <= limit and at(hi) <= budget:
            lo, step = hi, step * 2
            hi = min(lo + step, limit + 1)
        if hi > limit:
            return lo
    else:
        hi, lo, step = guess, guess - 1, 1
        while lo >= 1 and at(lo) > budget:
            hi, step = lo, step * 2
            lo = max(0, hi - step)
        if lo < 1:
            return None
    for _ in range(rounds):  # at(lo) <= budget < at(hi)
        if hi - lo <= 1:
            return lo
        rise = at(hi) - at(lo)
        mid = lo + (budget - at(lo)) * (hi - lo) // max(1, rise)
        if not lo < mid < hi:
            mid = (lo + hi) // 2
        if at(mid) <= budget:
            lo = mid
            if at(mid + 1) > budget:
                return mid
            lo = mid + 1
        else:
            hi = mid
    while hi - lo > 1:  # a step whose peak is far from a line: bisection
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(mid) <= budget else (lo, mid)
    return lo


def min_devices_traced(trace: dict, setup: TrainSetup, budget_bytes: int, capture_bytes: int = 0,
                       limit: int = 65_536, sharded: ShardedModel | None = None) -> int | None:
    """Fewest devices of ``budget_bytes`` each that fit the traced step under the strategy."""
    from dataclasses import replace

    def fits(world: int) -> bool:
        trial = replace(setup, devices=world, num_nodes=1)
        at = sharded.at_world(world) if sharded is not None else None
        return peak_memory_from_trace(trace, trial, capture_bytes, at)["peak_bytes"] <= budget_bytes
    return _fewest(fits, setup.strategy, limit)
