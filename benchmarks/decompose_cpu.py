"""CPU timing of the whole SmolLM2 decomposition (INT4 g128, GPTQ + 1 % in-sweep ortho, 128 x 512 calibration).

Run from the repo root: python benchmarks/decompose_cpu.py -> experiments/results/decompose-cpu.json
"""
import json, os, platform, time
import torch
import libortho
from libortho.data import DATA_DIR
torch.set_num_threads(os.cpu_count())
model, tok = libortho.load_model("smollm2")
calib = libortho.calibration_data(tok, str(DATA_DIR / "text" / "austen-emma.txt"), 128, 512, 0)
cfg = libortho.OrthoConfig(bits=4, group_size=128, density=0.01, score="hessian", method="gptq")
t = time.time()
libortho.decompose(model, cfg, calib=calib, device="cpu")
secs = time.time() - t
rep = libortho.report(model)["total"]
out = {"device": f"CPU {platform.machine()} x{os.cpu_count()}", "config": cfg.to_dict(), "calibration": calib.description,
       "decompose_seconds": secs, "bits_per_weight": rep["bits_per_weight"], "ortho_nnz": rep["ortho_nnz"],
       "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
print(json.dumps(out), flush=True)
json.dump(out, open("experiments/results/decompose-cpu.json", "w"), indent=1)
