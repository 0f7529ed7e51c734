"""Step time of manlearn vs the authors' published MAN++ CIFAR models (JunhaoSu0/MAN_PlusPlus @7b2d8a9,
networks/resnet{DGL,InfoPro}_MANPP.py, .cuda() made a no-op), ResNet-32 K=16 batch 128, random data,
interleaved (one step of each per round), median over rounds. The authors' code is not part of this repository: MAN_PLUSPLUS_DIR points at a checkout of it.

    MAN_PLUSPLUS_DIR=/path/to/MAN_PlusPlus python benchmarks/authors_code/speed.py ROUNDS WARMUP OUT.jsonl [AMP]

AMP: ``off`` (default), ``bf16`` or ``both``. With bf16 the authors' step runs under
``torch.autocast(<device>, bfloat16)`` (their code has no mixed precision of its own) and ours with
``amp_dtype=torch.bfloat16``; ``both`` steps the float32 and bf16 variants of all four in the same rounds.
"""
import contextlib, json, statistics, sys, time
import torch

from _authors import use_authors_code  # noqa: E402

use_authors_code()
from networks import resnetDGL_MANPP, resnetInfoPro_MANPP  # noqa: E402
from manlearn import LocalLearner  # noqa: E402
from manlearn.bench.common import environment, interleaved  # noqa: E402

rounds, warmup, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
amp_arg = sys.argv[4] if len(sys.argv) > 4 else "off"
if amp_arg not in ("off", "bf16", "both"):
    raise SystemExit(f"AMP must be off, bf16 or both, got {amp_arg!r}")
amps = ["off", "bf16"] if amp_arg == "both" else [amp_arg]
torch.manual_seed(0)
u = torch.rand(128, 3, 32, 32) * 0.98 + 0.01  # images in (0, 1), normalised as the authors' CIFAR code does
mean = torch.tensor([125.3, 123.0, 113.9]).view(1, 3, 1, 1) / 255
std = torch.tensor([63.0, 62.1, 66.7]).view(1, 3, 1, 1) / 255
x = (u - mean) / std
y = torch.randint(0, 10, (128,))
kw = dict(local_module_num=16, batch_size=128, image_size=32, dataset="cifar10", class_num=10,
          wide_list=(16, 16, 32, 64), dropout_rate=0, aux_net_widen=1, aux_net_feature_dim=128, momentum=0.995)
def build_theirs():
    return {
        "dgl+manpp": resnetDGL_MANPP.resnet32(aux_net_config="1c2f", local_loss_mode="cross_entropy", **kw),
        "infopro+manpp": resnetInfoPro_MANPP.resnet32(aux_net_config="2c2f", local_loss_mode="cross_entropy", **kw),
    }


lam = dict(ixx_1=5.0, ixy_1=0.5, ixx_2=0.0, ixy_2=0.0)


def sgd(params):
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True,
                           weight_decay=1e-4)


def tag(amp):
    """The suffix of a step's name: none in a float32-only run, else its precision."""
    return "" if amp_arg == "off" else f" {amp}"


steps = {}
for amp in amps:
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp == "bf16"
                else contextlib.nullcontext)
    for name, model in build_theirs().items():
        model.train()
        opt = sgd(model.parameters())
        def step(model=model, opt=opt, autocast=autocast):
            opt.zero_grad()
            with autocast():  # their forward also runs the local backward passes; autocast leaves those alone
                model(img=x, target=y, **lam)
            opt.step()
        steps[f"authors {name}{tag(amp)}"] = step
    for name in ("dgl+manpp", "infopro+manpp"):
        base, method = name.split("+")
        learner = LocalLearner("resnet32", method=method, base=base, K=16, channels_last=True,
                               amp_dtype=torch.bfloat16 if amp == "bf16" else None)
        opt = sgd(learner.parameters())
        xc = x.contiguous(memory_format=torch.channels_last)
        def step(learner=learner, opt=opt, xc=xc):
            learner.train_step(xc, y)  # zero_grad inside
            opt.step()
        steps[f"manlearn {name}{tag(amp)}"] = step
times = interleaved(steps, rounds, warmup)
row = {"what": "s/iter, ResNet-32 K=16 batch 128, interleaved", "rounds": rounds, "warmup": warmup,
       "amp": amp_arg, **environment("cpu"), "date": time.strftime("%Y-%m-%d %H:%M"),
       "median_s": {k: statistics.median(v) for k, v in times.items()}, "min_s": {k: min(v) for k, v in times.items()}}
for amp in amps:
    for name in ("dgl+manpp", "infopro+manpp"):
        t = tag(amp)
        row[f"ratio {name}{t}"] = row["median_s"][f"manlearn {name}{t}"] / row["median_s"][f"authors {name}{t}"]
if amp_arg == "both":  # ours in bf16 against theirs as published (float32)
    for name in ("dgl+manpp", "infopro+manpp"):
        row[f"ratio {name} ours bf16 / theirs float32"] = (row["median_s"][f"manlearn {name} bf16"]
                                                           / row["median_s"][f"authors {name} off"])
with open(out, "a") as f:
    f.write(json.dumps(row) + "\n")
print(json.dumps(row, indent=1))
