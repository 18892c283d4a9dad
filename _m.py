import torch, sys
sys.path.insert(0, "tests")
from ddpm_lightning import schedules
from ddpm_lightning.samplers import ddim, ald
from oracles import BatchNoise, GaussianMixture, MixtureDenoiser
from test_score_samplers import MIXTURE, mixture_z_scores
s = schedules.linear()
d = MixtureDenoiser(MIXTURE, s)
xT = BatchNoise(0).randn_like(torch.empty(2000, 2, dtype=torch.float64))
ref = ddim(d, xT.clone(), BatchNoise(0), steps=1000)
for st in (501, 600, 999):
    x = ddim(d, xT.clone(), BatchNoise(0), steps=st)
    print(st, (x-ref).abs().max().item(), mixture_z_scores(x).abs().max().item())
G = GaussianMixture([1.0], [[0.3, -0.2]], [[[0.25, 0], [0, 0.04]]])
n = schedules.ncsn()
dn = MixtureDenoiser(G, n)
for lv in range(1, 11):
    seen = []
    x = ald(dn, BatchNoise(0).randn_like(torch.empty(4000, 2, dtype=torch.float64)), BatchNoise(1), levels=lv)
    tl = n.timesteps(lv)
    sl = n.sigmas[tl[-1]].item()
    var = torch.tensor([0.25, 0.04]).double()
    want = var**2 / (var + sl**2)
    print(lv, tl[0], round(sl,3), x.mean(0).tolist(), (x.var(0)/want).tolist())
