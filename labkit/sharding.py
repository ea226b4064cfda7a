"""Memory per device when a run is spread over several GPUs: data parallelism (DDP) and ZeRO stages 1-3 / FSDP.

The ZeRO paper (Rajbhandari et al. 2020, section 5 and figure 1) splits a run's *model states* in three:

- parameters: the copy the forward and backward read (2 bytes per parameter in fp16/bf16);
- gradients: one per trainable parameter (2 bytes in fp16, 4 in fp32);
- optimizer states: K bytes per trainable parameter; mixed-precision Adam keeps an fp32 master copy,
  momentum and variance, K = 4 + 4 + 4 = 12.

With N_d data-parallel devices, DDP replicates all three on every device: (2 + 2 + K) * psi. ZeRO stage 1
splits the optimizer states over the devices: 2 psi + 2 psi + K psi / N_d; stage 2 also the gradients:
2 psi + (2 + K) psi / N_d; stage 3 also the parameters: (2 + 2 + K) psi / N_d. FSDP with full sharding is
stage 3. Activations and logits are never split by ZeRO: each device keeps those of its own micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from labkit import LabkitError
from labkit.memory import GB, MemoryBreakdown, estimate_memory

ZERO_STAGES = {
    0: "DDP: everything replicated",
    1: "ZeRO-1: optimizer states sharded",
    2: "ZeRO-2: optimizer states and gradients sharded",
    3: "ZeRO-3 / FSDP: optimizer states, gradients and parameters sharded",
}
MASTER_BYTES = 4  # the fp32 master copy of a trainable parameter that mixed precision keeps with the optimizer


@dataclass(frozen=True)
class ModelStates:
    """A run's model states in bytes, split as the ZeRO paper splits them."""

    parameters: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        """All three together."""
        return self.parameters + self.gradients + self.optimizer


def check_devices(devices: int, stage: int) -> None:
    """Raise a LabkitError unless devices is a positive integer and stage one of ZERO_STAGES."""
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise LabkitError(f"devices is how many GPUs share the run, a positive integer; got {devices!r}.")
    if stage not in ZERO_STAGES:
        raise LabkitError(f"zero_stage {stage!r} is not a ZeRO stage: use 0 (DDP), 1, 2 or 3 (= FSDP full shard).")


def zero_states(model: Any, method: str = "full", *, dtype: str = "bf16", optimizer: str = "adamw",
                grad_dtype: str = "fp32", r: int = 16, target_modules: Any = "all-linear",
                double_quant: bool = True) -> ModelStates:
    """A run's model states per replica from labkit.memory's estimate, the fp32 master copy counted as optimizer state.

    grad_dtype: 'fp32' as labkit.memory counts gradients (PyTorch AMP), 'fp16'/'bf16' as the ZeRO paper does.
    """
    if grad_dtype not in ("fp32", "fp16", "bf16"):
        raise LabkitError(f"grad_dtype {grad_dtype!r}: use 'fp32', 'fp16' or 'bf16'.")
    replica = estimate_memory(model, method, dtype=dtype, optimizer=optimizer, r=r, target_modules=target_modules,
                              double_quant=double_quant, batch=1, seq_len=1)
    trainable = replica.gradients / MASTER_BYTES  # labkit.memory keeps one fp32 gradient per trainable parameter
    master = trainable * MASTER_BYTES if method == "full" and dtype != "fp32" else 0
    grad_bytes = MASTER_BYTES if grad_dtype == "fp32" else 2
    return ModelStates(parameters=replica.weights - master, gradients=trainable * grad_bytes,
                       optimizer=replica.optimizer + master)


def per_device(states: ModelStates, devices: int, stage: int) -> ModelStates:
    """The model states one of `devices` devices holds at a ZeRO stage (0 = DDP, 3 = FSDP full shard)."""
    check_devices(devices, stage)
    return ModelStates(parameters=states.parameters / (devices if stage >= 3 else 1),
                       gradients=states.gradients / (devices if stage >= 2 else 1),
                       optimizer=states.optimizer / (devices if stage >= 1 else 1))


def estimate_memory_per_device(model: Any, method: str = "full", *, devices: int = 1, zero_stage: int = 0,
                               grad_dtype: str = "fp32", **options: Any) -> MemoryBreakdown:
    """labkit.memory.estimate_memory on one of `devices` GPUs at a ZeRO stage; `batch` is the per-device micro-batch.

    weights, gradients and optimizer are the sharded model states (the fp32 master copy under optimizer);
    activations and logits are those of the device's own micro-batch, never sharded.
    """
    check_devices(devices, zero_stage)
    state_options = {k: options[k] for k in ("dtype", "optimizer", "r", "target_modules", "double_quant") if k in options}
    states = per_device(zero_states(model, method, grad_dtype=grad_dtype, **state_options), devices, zero_stage)
    replica = estimate_memory(model, method, **options)
    return MemoryBreakdown(weights=round(states.parameters), gradients=round(states.gradients),
                           optimizer=round(states.optimizer), activations=replica.activations, logits=replica.logits,
                           label=f"{replica.label}, {devices} device(s), {ZERO_STAGES[zero_stage]}")

