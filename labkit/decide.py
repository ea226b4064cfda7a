"""Fine-tune, RAG or prompt? The seed articles' decision rules, tables and cost figures, as data and functions."""

from __future__ import annotations

from dataclasses import dataclass, field

from labkit import LabkitError
from labkit.memory import MemoryBreakdown, estimate_memory, fits, format_bytes, resolve_shape

PROMPT = "prompt engineering"
RAG = "RAG"
FINE_TUNE = "fine-tuning"
RAG_AND_FINE_TUNE = "RAG + fine-tuning"


@dataclass(frozen=True)
class Question:
    """One step of the decision framework: the question and the approach a yes leads to."""

    key: str
    text: str
    if_yes: str


# Seed 000, "Ask these questions in order". The fourth follows from the second and third.
QUESTIONS: tuple[Question, ...] = (
    Question("prompt_works", "Can I solve this with a better prompt?", PROMPT),
    Question("lacks_knowledge", "Does the model need knowledge it does not have?", RAG),
    Question("needs_behaviour_change", "Do I need the model to behave differently at a fundamental level?",
             FINE_TUNE),
    Question("needs_both", "Do I need both new knowledge and new behavior?", RAG_AND_FINE_TUNE),
)


@dataclass
class Recommendation:
    """What to do, and why, one reason per step taken."""

    approach: str
    reasons: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join([f"Recommendation: {self.approach}"] + [f"  - {r}" for r in self.reasons])


def _yes_no(answer: bool) -> str:
    """'yes' or 'no'."""
    return "yes" if answer else "no"


def recommend(prompt_works: bool, lacks_knowledge: bool, needs_behaviour_change: bool) -> Recommendation:
    """Walk the decision questions in order and recommend an approach with its reasons."""
    answers = {"prompt_works": prompt_works, "lacks_knowledge": lacks_knowledge,
               "needs_behaviour_change": needs_behaviour_change}
    for key, value in answers.items():
        if not isinstance(value, bool):
            raise LabkitError(f"{key} answers a yes/no question: pass True or False, got {value!r}.")
    answers["needs_both"] = lacks_knowledge and needs_behaviour_change
    reasons = []
    for q in QUESTIONS:
        reasons.append(f"{q.text} {_yes_no(answers[q.key])}.")
        if q.key == "prompt_works" and prompt_works:
            return Recommendation(PROMPT, reasons + ["A better prompt solves it: do that and stop here."])
    if answers["needs_both"]:
        return Recommendation(RAG_AND_FINE_TUNE, reasons + [
            "RAG supplies the knowledge at inference time; fine-tuning changes the behaviour."])
    if lacks_knowledge:
        return Recommendation(RAG, reasons + ["Fine-tuning adjusts behaviour, it does not reliably add knowledge."])
    if needs_behaviour_change:
        return Recommendation(FINE_TUNE, reasons + ["The problem is how the model responds, not what it knows."])
    return Recommendation(PROMPT, reasons + ["Nothing calls for RAG or fine-tuning: keep improving the prompt."])


@dataclass(frozen=True)
class SignalRow:
    """One row of the signal -> approach table."""

    key: str
    signal: str
    approach: str


# Seed 003, "Use this criteria table to pressure-test your decision".
SIGNALS: tuple[SignalRow, ...] = (
    SignalRow("lacks-facts", "Model lacks domain-specific facts", "RAG"),
    SignalRow("ignores-format", "Model has the knowledge but ignores your format requirements", "Fine-tuning"),
    SignalRow("too-verbose", "Output is correct but too verbose or too casual",
              "Prompt engineering first; fine-tune if that fails"),
    SignalRow("latency", "You need sub-100ms latency and GPT-4 is too slow", "Fine-tune a smaller open-weight model"),
    SignalRow("strict-json", "You need strict JSON/structured output, consistently", "Fine-tuning"),
    SignalRow("weekly-docs", "Your use case involves documents that change weekly",
              "RAG (fine-tuning can't update knowledge cheaply)"),
    SignalRow("reasoning-chain", "You need the model to follow a domain-specific reasoning chain", "Fine-tuning"),
)


def approach_for_signal(signal: str) -> str:
    """The recommended approach for a signal, given by its key or its text (case-insensitive)."""
    wanted = signal.strip().lower()
    for row in SIGNALS:
        if wanted in (row.key, row.signal.lower()):
            return row.approach
    keys = ", ".join(row.key for row in SIGNALS)
    raise LabkitError(f"Unknown signal {signal!r}. Use a key ({keys}) or a signal's text from SIGNALS.")


# Seed 003, "the five dimensions that matter most in production".
APPROACHES = (PROMPT, RAG, FINE_TUNE)
COMPARISON: dict[str, dict[str, str]] = {
    "setup cost": {PROMPT: "Minutes to hours", RAG: "Days to weeks", FINE_TUNE: "Days to weeks"},
    "inference latency": {PROMPT: "Baseline", RAG: "+20-200ms (retrieval)",
                          FINE_TUNE: "Lower (smaller model possible)"},
    "knowledge freshness": {PROMPT: "Static (in-context only)", RAG: "Real-time", FINE_TUNE: "Static until retrained"},
    "output consistency": {PROMPT: "Low - prompt-sensitive", RAG: "Medium", FINE_TUNE: "High"},
    "ongoing maintenance": {PROMPT: "Low", RAG: "Medium (index updates)", FINE_TUNE: "High (retraining on drift)"},
}


@dataclass(frozen=True)
class MethodRow:
    """One row of the method table, with the estimator's name for it (None: no local training)."""

    name: str
    when_to_use: str
    vram: str
    quality_ceiling: str
    memory_method: str | None


# Seed 002, "The Method Decision Framework".
METHODS: tuple[MethodRow, ...] = (
    MethodRow("Full FT", "Significant task distribution shift; large dataset (>50K examples)",
              "High (full model)", "Best", "full"),
    MethodRow("LoRA", "Adapter for a new task; <10K examples; limited GPU budget",
              "Medium (adapter only)", "Near-full-FT", "lora"),
    MethodRow("QLoRA", "Consumer GPU; 4-bit base + LoRA adapter; cost-constrained",
              "Low", "Slightly below LoRA", "qlora"),
    MethodRow("Prompt tuning", "API-only access; very small dataset; fast iteration", "Zero", "Limited", None),
)
FULL_FT_MIN_EXAMPLES = 50_000  # seed 002: full FT for a large dataset (>50K examples)
MIN_FINE_TUNE_EXAMPLES = 50  # seed 004: do not fine-tune with fewer than 50 high-quality examples


def pick_method(n_examples: int, gpu_gb: float, model_params: object, *, api_only: bool = False,
                batch: int = 1, seq_len: int = 2048) -> Recommendation:
    """The method table's choice: the most capable method the data justifies and the GPU holds.

    model_params: a parameter count (sized like the nearest preset), a preset name such as "7B",
    a ModelShape or a transformers config. Memory is estimated in bf16 with gradient checkpointing.
    """
    if not isinstance(n_examples, int) or n_examples < 0:
        raise LabkitError(f"n_examples is a count of training examples (an integer >= 0), got {n_examples!r}.")
    if gpu_gb < 0:
        raise LabkitError(f"gpu_gb is the GPU's memory in GB (0 for none), got {gpu_gb}.")
    if api_only or gpu_gb == 0:
        return Recommendation("Prompt tuning", ["API-only access (no GPU): no local training."])
    if n_examples < MIN_FINE_TUNE_EXAMPLES:
        return Recommendation("Prompt tuning", [
            f"{n_examples} examples is a very small dataset (< {MIN_FINE_TUNE_EXAMPLES}): too few to fine-tune."])
    shape = resolve_shape(model_params)
    reasons = []
    for row in METHODS[:3]:
        memory = estimate_memory(shape, row.memory_method, batch=batch, seq_len=seq_len, gradient_checkpointing=True)
        if row.name == "Full FT" and n_examples <= FULL_FT_MIN_EXAMPLES:
            reasons.append(f"Full FT: {n_examples} examples is not a large dataset (>{FULL_FT_MIN_EXAMPLES}).")
            continue
        if fits(memory, gpu_gb):
            return Recommendation(row.name, reasons + [
                f"{row.name} needs ~{format_bytes(memory.total)}, which fits {gpu_gb:g} GB ({row.when_to_use})."])
        reasons.append(f"{row.name} needs ~{format_bytes(memory.total)}: more than {gpu_gb:g} GB.")
    return Recommendation("none fits", reasons + [
        "Use a bigger GPU, several GPUs, a smaller model or a cloud fine-tuning API."])


@dataclass(frozen=True)
class SizingRow:
    """A dataset sizing heuristic: how many examples a kind of task needs (None: no bound given)."""

    task: str
    min_examples: int | None
    max_examples: int | None
    note: str


# Seed 002, "Dataset sizing heuristics".
DATASET_SIZING: tuple[SizingRow, ...] = (
    SizingRow("classification/extraction", 500, 2_000, "examples per class, typically sufficient for LoRA"),
    SizingRow("style/format transfer", 1_000, 5_000, "examples of the target style"),
    SizingRow("domain adaptation", 10_000, None, "if the domain vocabulary diverges significantly from pretraining"),
    SizingRow("instruction following (general)", None, 50_000, "diminishing returns above 50,000 high-quality pairs"),
)

INSTRUCTION_SHARE_LIMIT = 0.40  # seed 001: above this share of instruction tokens, fine-tuning probably wins


def instruction_share(instruction_tokens: int, task_tokens: int) -> float:
    """The share of a prompt's tokens that are instructions rather than task content."""
    if instruction_tokens < 0 or task_tokens < 0 or instruction_tokens + task_tokens == 0:
        raise LabkitError("Token counts must be >= 0 and not both 0, "
                          f"got instruction_tokens={instruction_tokens}, task_tokens={task_tokens}.")
    return instruction_tokens / (instruction_tokens + task_tokens)


def prompt_too_heavy(share: float) -> bool:
    """True if instructions exceed 40 % of the prompt: fine-tuning would likely be better and cheaper."""
    if not 0 <= share <= 1:
        raise LabkitError(f"share is a fraction in [0, 1] (see instruction_share), got {share}.")
    return share > INSTRUCTION_SHARE_LIMIT


@dataclass(frozen=True)
class GpuTier:
    """One row of the GPU-tier cost table: hardware, price and hours for 1,000 examples."""

    model_size: str
    method: str
    gpu: str
    gpu_count: int
    gpu_gb: int
    dollars_per_hour: float
    hours_per_1k: tuple[float, float]


# Seed 004, "Cost analysis across GPU tiers" (training time for 1K examples).
GPU_TIERS: tuple[GpuTier, ...] = (
    GpuTier("7-8B", "lora", "1x A100 40GB", 1, 40, 2, (1, 2)),
    GpuTier("7-8B", "qlora", "1x A10G 24GB", 1, 24, 1, (2, 3)),
    GpuTier("7-8B", "full", "2x A100 80GB", 2, 80, 6, (4, 8)),
    GpuTier("13B", "lora", "1x A100 80GB", 1, 80, 3, (2, 4)),
    GpuTier("70B", "qlora", "1x A100 80GB", 1, 80, 3, (8, 16)),
    GpuTier("70B", "lora", "4x A100 80GB", 4, 80, 12, (4, 8)),
    GpuTier("70B", "full", "8x A100 80GB", 8, 80, 24, (24, 48)),
)
SIZE_ALIASES = {"7b": "7-8B", "8b": "7-8B", "7-8b": "7-8B", "13b": "13B", "70b": "70B"}
SIZE_PRESET = {"7-8B": "8B", "13B": "13B", "70B": "70B"}  # the seed's examples are Llama-3.1-8B


@dataclass(frozen=True)
class CostEstimate:
    """Hardware, time, money and memory of one fine-tuning run."""

    tier: GpuTier
    hours: tuple[float, float]
    dollars: tuple[float, float]
    memory: MemoryBreakdown
    fits: bool
    note: str

    def __str__(self) -> str:
        (h0, h1), (d0, d1) = self.hours, self.dollars
        fit = "fits" if self.fits else "does NOT fit"
        return (f"{self.tier.model_size} {self.tier.method} on {self.tier.gpu}: {h0:g}-{h1:g} h, ${d0:,.0f}-{d1:,.0f}\n"
                f"memory ~{format_bytes(self.memory.total)}, {fit} in {self.tier.gpu_count * self.tier.gpu_gb} GB\n"
                f"{self.note}")


def gpu_tier(model_size: str, method: str) -> GpuTier:
    """The table row for a model size ("7B", "8B", "7-8B", "13B", "70B") and method."""
    size = SIZE_ALIASES.get(str(model_size).strip().lower())
    for tier in GPU_TIERS:
        if tier.model_size == size and tier.method == method:
            return tier
    rows = ", ".join(f"{t.model_size}/{t.method}" for t in GPU_TIERS)
    raise LabkitError(f"No cost row for model_size={model_size!r}, method={method!r}. The table has: {rows}.")


def training_cost(model_size: str, method: str, n_examples: int, **memory_options: object) -> CostEstimate:
    """GPU, hours and dollars from the seed's table, scaled linearly from its 1K-example times, plus memory.

    memory_options go to labkit.memory.estimate_memory (default: batch 1 x 2048, bf16, checkpointing).
    """
    tier = gpu_tier(model_size, method)
    if not isinstance(n_examples, int) or n_examples < 1:
        raise LabkitError(f"n_examples must be a positive integer, got {n_examples!r}.")
    scale = n_examples / 1000
    hours = (tier.hours_per_1k[0] * scale, tier.hours_per_1k[1] * scale)
    options = {"batch": 1, "seq_len": 2048, "gradient_checkpointing": True} | memory_options
    memory = estimate_memory(SIZE_PRESET[tier.model_size], method, **options)
    note = (f"Times are the table's for 1,000 examples, scaled linearly to {n_examples:,} (a rough guide: real "
            "time depends on sequence length and epochs). Several GPUs hold the run only if it is sharded.")
    return CostEstimate(tier, hours, (hours[0] * tier.dollars_per_hour, hours[1] * tier.dollars_per_hour),
                        memory, fits(memory, tier.gpu_count * tier.gpu_gb), note)


@dataclass(frozen=True)
class ApiPrice:
    """A managed fine-tuning API and its price range per 1M training tokens."""

    vendor: str
    service: str
    dollars_per_million: tuple[float, float]


# Seed 004, cloud fine-tuning APIs (approximate).
API_PRICES: dict[str, ApiPrice] = {
    "bedrock": ApiPrice("AWS", "Bedrock Custom Models", (8, 12)),
    "vertex": ApiPrice("Google", "Vertex AI Tuning", (5, 10)),
    "azure": ApiPrice("Azure", "Azure AI Foundry", (6, 15)),
    "openai": ApiPrice("OpenAI", "Fine-tuning API (GPT-4o)", (25, 25)),
}


def api_cost(training_tokens: int, provider: str) -> tuple[float, float]:
    """Dollars (low, high) to fine-tune on training_tokens (dataset tokens x epochs) with a managed API."""
    key = provider.strip().lower()
    by_vendor = {price.vendor.lower(): name for name, price in API_PRICES.items()}
    price = API_PRICES.get(by_vendor.get(key, key))
    if price is None:
        raise LabkitError(f"Unknown provider {provider!r}: use one of {list(API_PRICES)} (or AWS, Google, Azure).")
    if training_tokens < 0:
        raise LabkitError(f"training_tokens must be >= 0, got {training_tokens}.")
    low, high = price.dollars_per_million
    return (training_tokens / 1e6 * low, training_tokens / 1e6 * high)


def wizard():
    """An ipywidgets form over `recommend`: one checkbox per question, the recommendation below."""
    import ipywidgets as widgets

    def show(prompt_works: bool, lacks_knowledge: bool, needs_behaviour_change: bool) -> Recommendation:
        result = recommend(prompt_works, lacks_knowledge, needs_behaviour_change)
        print(result)
        return result

    boxes = {q.key: widgets.Checkbox(value=False, description=q.text, indent=False,
                                     layout=widgets.Layout(width="auto"))
             for q in QUESTIONS[:3]}
    form = widgets.interactive(show, **boxes)
    form.update()  # ipywidgets 8 runs `show` on construction, 7.x (Colab's 7.7) only on the first change: run it now
    return form
