"""The authors' published DGL+MAN++ CIFAR model (JunhaoSu0/MAN_PlusPlus, networks/resnetDGL_MANPP.py, run
unmodified; .cuda() made a no-op) trained on FM-R32 (manlearn's data pipeline, batches and cosine schedule),
to compare its seed spread with manlearn's dgl+manpp. The authors' code is not part of this repository: MAN_PLUSPLUS_DIR points at a checkout of it.

    MAN_PLUSPLUS_DIR=/path/to/MAN_PlusPlus python benchmarks/authors_code/dgl_manpp_fm_r32.py SEED OUT.jsonl [STEPS]
"""
import json, sys, time, platform
import torch

from _authors import use_authors_code  # noqa: E402

use_authors_code()
from networks.resnetDGL_MANPP import resnet32  # noqa: E402

from manlearn.bench.accuracy import fm_r32_config  # noqa: E402
from manlearn.runtime import seed_everything  # noqa: E402
from manlearn.train.schedule import lr_at  # noqa: E402
from manlearn.train.task_runs import ClassificationRun  # noqa: E402

seed, out = int(sys.argv[1]), sys.argv[2]
limit = int(sys.argv[3]) if len(sys.argv) > 3 else None
cfg = fm_r32_config("dgl+manpp", 16, 1, seed, "/tmp/unused")
seed_everything(seed)
model = resnet32(local_module_num=16, batch_size=128, image_size=32, dataset="cifar10", class_num=10,
                 wide_list=(16, 16, 32, 64), dropout_rate=0, aux_net_config="1c2f", local_loss_mode="cross_entropy",
                 aux_net_widen=1, aux_net_feature_dim=128, momentum=0.995)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
run = ClassificationRun(cfg, torch.device("cpu"))
spe = run.steps_per_epoch
steps = limit or spe
traj = []
t0 = time.perf_counter()
model.train()
for i, (x, y, n) in enumerate(run.batches(0, 0, steps)):
    lr = lr_at(cfg, i, spe)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad()
    model(img=x.contiguous(), target=y)
    opt.step()
    if (i + 1) % 50 == 0 or i + 1 == steps:
        s = [float(model.ema_s_first.detach())] + [float(p.detach()) for p in model.ema_s]
        traj.append({"step": i + 1, **{f"s/{k}": v for k, v in enumerate(s)}})
        print(f"step {i + 1}/{steps} {(time.perf_counter() - t0) / (i + 1):.2f} s/it", flush=True)
train_s = time.perf_counter() - t0
model.eval()
correct = total = 0
with torch.no_grad():
    for x, y in run.test_loader.epoch(0):
        logits, _ = model(img=x.contiguous(), target=y)
        correct += int((logits.argmax(1) == y).sum())
        total += int(y.numel())
row = dict(code="authors JunhaoSu0/MAN_PlusPlus@7b2d8a9 resnetDGL_MANPP", method="dgl+manpp", K=16, epochs=1,
           seed=seed, steps=steps, test_acc=correct / total, seconds_per_iter=train_s / steps, aux_trajectory=traj,
           torch=torch.__version__, threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"),
           python=platform.python_version())
with open(out, "a") as f:
    f.write(json.dumps(row) + "\n")
print(json.dumps({k: v for k, v in row.items() if k != "aux_trajectory"}))
