"""Print the numbers behind issue 3's SFT must-shows: TRL loss parity, resume, forced NaN, peft reload.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sft_checks.py
"""
import copy, sys, torch, tempfile, pathlib

from labkit.models import load_model
from labkit.data import read_jsonl
from labkit.paths import data_dir
from labkit.sft import *
from labkit.sft import SFTConfig
from peft import PeftModel
torch.set_num_threads(1)
TINY = SFTConfig(steps=4, batch_size=2, lr=1e-3, r=4, lora_alpha=8, eval_every=2, seed=0)
base, tok = load_model()
ex = read_jsonl(data_dir() / "train.jsonl")[:16]
# 1 TRL loss parity
from datasets import Dataset
from trl.trainer.sft_trainer import SFTConfig as TRLConfig, SFTTrainer
model = add_lora(copy.deepcopy(base), TINY)
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n: p.normal_(0, 0.02)
data = Dataset.from_list([{"prompt": e["messages"][:-1], "completion": e["messages"][-1:]} for e in ex[:4]])
tr = SFTTrainer(model=model, args=TRLConfig(output_dir="/tmp/labkit-sft-checks-trl", report_to="none", bf16=False, use_cpu=True, max_length=512), train_dataset=data, processing_class=tok)
batch = tr.data_collator([tr.train_dataset[i] for i in range(4)])
ours = collate([tokenize_chat(tok, e["messages"]) for e in ex[:4]], tok.pad_token_id)
with torch.no_grad():
    t = tr.compute_loss(model, batch).item(); tot, n = assistant_loss(model, ours)
print(f"TRL loss {t:.8f} labkit {tot.item()/n:.8f} diff {abs(t-tot.item()/n):.2e}")
# 2 resume
cfg = SFTConfig(**{**TINY.__dict__, "checkpoint_every": 1})
full = train_sft(copy.deepcopy(base), tok, ex[:8], None, cfg, plot=False, progress=False)
d = pathlib.Path(tempfile.mkdtemp())
train_sft(copy.deepcopy(base), tok, ex[:8], None, cfg, out_dir=d, plot=False, progress=False, stop_after=2)
res = train_sft(copy.deepcopy(base), tok, ex[:8], None, cfg, out_dir=d, resume=True, plot=False, progress=False)
print(f"resume: full {full.history[-1]['loss']:.8f} resumed {res.history[-1]['loss']:.8f} diff {abs(full.history[-1]['loss']-res.history[-1]['loss']):.2e}")
# 3 NaN
d2 = pathlib.Path(tempfile.mkdtemp())
cfgn = SFTConfig(**{**TINY.__dict__, "lr": 1e30, "max_grad_norm": 1e30, "checkpoint_every": 1})
try:
    train_sft(copy.deepcopy(base), tok, ex[:8], None, cfgn, out_dir=d2, plot=False, progress=False)
except TrainingDiverged as e:
    print("diverged message:", e)
ck = latest_checkpoint(d2); st = torch.load(ck / "state.pt", weights_only=False)
print("last good checkpoint", ck.name, "step", st["step"], "finite", all(torch.isfinite(v).all().item() for v in st["adapter"].values()))
# 4 peft reload
d3 = pathlib.Path(tempfile.mkdtemp())
full.model.save_pretrained(d3)
re = PeftModel.from_pretrained(copy.deepcopy(base), d3)
b = collate([tokenize_chat(tok, ex[0]["messages"])], tok.pad_token_id)
with torch.no_grad():
    print("peft reload max |diff| logits", (full.model(input_ids=b["input_ids"]).logits - re(input_ids=b["input_ids"]).logits).abs().max().item())
