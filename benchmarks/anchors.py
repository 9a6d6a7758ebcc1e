"""Published memory rules of thumb, reimplemented from their formulas (the anchors in BENCHMARKS.md).

Each function gives bytes for one device; none of them counts the logits, the CUDA
context or allocator overhead. They are comparison points, not forecasts of ours.
"""

from __future__ import annotations


def deepspeed_zero2_model_states(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                 cpu_offload: bool = False) -> int:
    """GPU bytes of model states under ZeRO-2.

    DeepSpeed ``deepspeed/runtime/zero/stage_1_and_2.py``,
    ``estimate_zero2_model_states_mem_needs``: without offload
    ``gpu_mem = 4 * total_params + int(16 * total_params / total_gpus)``; with CPU offload
    ``gpu_mem = 2 * total_params``.
    """
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        return 2 * total_params
    return 4 * total_params + int(16 * total_params / total_gpus)


def deepspeed_zero3_model_states(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1,
                                 num_nodes: int = 1) -> int:
    """GPU bytes of model states under ZeRO-3, no offload.

    DeepSpeed ``deepspeed/runtime/zero/stage3.py``, ``estimate_zero3_model_states_mem_needs``:
    ``largest_layer_memory = 4 * largest_layer_params``;
    ``gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)``.
    """
    total_gpus = num_nodes * num_gpus_per_node
    return 4 * largest_layer_params + int(18 * total_params / total_gpus)


def accelerate_training(total_params: int, dtype: str = "float32") -> int:
    """``accelerate estimate-memory``'s "Training using Adam" column (parameter bytes only).

    HF Accelerate ``src/accelerate/commands/estimate.py``: ``total_size`` is the fp32 size
    of the parameters (4 bytes each); ``estimate_training_usage(bytes, mixed_precision)`` gives
    per stage, for float32: model = gradients = fp32, optimizer = 2 x fp32, step = 4 x fp32;
    for float16/bfloat16: model = fp32, gradients = fp32 + fp16, optimizer = step = 2 x fp32.
    The command prints ``max(...)`` of the stages.
    """
    fp32 = 4 * total_params
    fp16 = fp32 // 2
    if dtype == "float32":
        stages = {"model": fp32, "gradients": fp32, "optimizer": 2 * fp32, "step": 4 * fp32}
    elif dtype in ("float16", "bfloat16"):
        stages = {"model": fp32, "gradients": fp32 + fp16, "optimizer": 2 * fp32, "step": 2 * fp32}
    else:
        raise ValueError(dtype)
    return max(stages.values())


def sixteen_bytes_per_param(total_params: int) -> int:
    """Mixed-precision Adam model states: 2 (16-bit weights) + 2 (16-bit grads) + 12 (fp32 master,
    momentum, variance) = 16 bytes per parameter.

    Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
    Models", Sec. 3.1 (``2Psi + 2Psi + K*Psi`` with ``K = 12``).
    """
    return 16 * total_params


def korthikanti_activations(seq: int, batch: int, hidden: int, heads: int, layers: int) -> int:
    """Activation bytes of ``layers`` transformer layers, 16-bit activations, no parallelism,
    no recomputation, the logits/loss not included.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
    (arXiv:2205.05198), Eq. 1: per layer ``s*b*h*(34 + 5*a*s/h)`` bytes. The ``5as/h`` term is
    the materialised attention scores (softmax, its dropout mask and output), which flash
    attention does not keep.
    """
    s, b, h, a = seq, batch, hidden, heads
    return layers * (s * b * h * 34 + 5 * a * s * s * b)


def megatron_theoretical_memory(seq: int, batch: int, hidden: int, heads: int, layers: int, vocab: int,
                                ffn_hidden: int, kv_heads: int | None = None, swiglu: bool = False,
                                rmsnorm: bool = False, untied: bool = False) -> dict[str, int]:
    """Megatron-LM's ``report_theoretical_memory`` on one GPU: no tensor, pipeline or sequence parallelism,
    no distributed optimizer, no MoE/MTP (bytes; Megatron prints them divided by 2**20 as "MB").

    NVIDIA/Megatron-LM ``megatron/training/theoretical_memory_usage.py``
    (https://github.com/NVIDIA/Megatron-LM/blob/00caa53af30912914981c86f39db123961678bbd/megatron/training/theoretical_memory_usage.py):
    ``compute_weight_and_optimizer_memory``: parameters by its own formula, per layer
    ``2*h*(ffn*(3/2 if swiglu else 1) + norm) + 2*h*h*(1 + groups/heads)*(kv_channels*heads/h)`` (``norm`` = 1 for
    RMSNorm, 2 for LayerNorm), plus ``h*V`` embedding (twice when untied), plus the final norm ``norm*h``;
    no position embedding and no linear biases counted; ``num_bytes_per_parameter = 18`` without the
    distributed optimizer. ``compute_activation_memory_without_sp`` (the path ``report_theoretical_memory``
    takes without sequence parallelism): per layer ``s*b*h*(10 + 24/tp)``, times L, ``+ 8*s*b`` (embedding input)
    ``+ s*b*h`` (embedding dropout), ``+ (s*b*V/tp + s*b*h) * 2`` (logits and final norm output, pp = 1),
    the whole times 1.05 ("optimizer and miscellaneous temporaries").
    """
    s, b, h, a, V = seq, batch, hidden, heads, vocab
    groups = a if kv_heads is None else kv_heads
    norm = 1 if rmsnorm else 2
    kv_channels = h // a
    attn = 2 * h * h * ((1 + groups / a) * (kv_channels * a / h))
    per_layer = 2 * h * (ffn_hidden * (1.5 if swiglu else 1) + norm) + attn
    embedding = h * V
    params = per_layer * layers + norm * h + embedding * (2 if untied else 1)
    weights_optimizer = params * 18
    tp = 1
    acts = s * b * h * (10 + 24 / tp) * layers + 8 * s * b + s * b * h + (s * b * V / tp + s * b * h) * 2
    acts *= 1.05
    return {"params": int(params), "weights_optimizer": int(weights_optimizer), "activations": int(acts),
            "total": int(weights_optimizer + acts)}
