"""KD^3 and SAKD against their authors' code, point by point (issue 16, docs/methods.md): each
default pinned on a small hand-computed case, and each earlier webdistill choice still reachable as
`variant: webdistill` or its own switch.

Official code: tangjialiang97/KD3 (folder KDDD/) and zju-vipa/spot-adaptive-pytorch (train.py, configs)."""
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from curation.policies import apply_policies, parse_policy
from distill.kd3_rules import class_thresholds, combine_weight, combined_prediction, passes_threshold
from distill.losses import PoolPass, build_distiller
from distill.losses.kd3 import alignment_weights, same_size
from distill.losses.sakd import at_per_sample
from distill.models import mnist_teacher, tiny_student
from distill.train import make_optimizer, set_lr

torch.set_num_threads(1)


def models(seed=0):
    torch.manual_seed(seed)
    return tiny_student(10), mnist_teacher(10)


def images(n=8, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def kd3(**params):
    student, teacher = models()
    return build_distiller({"method": "kd3", **params}, student, teacher, 10).train()


def sakd(weights=None, **params):
    student, teacher = models()
    return build_distiller({"method": "sakd", **params, "weights": weights or {}}, student, teacher, 10).train()


# --- KD^3 1: class counts over every argmax ------------------------------------------------------
def sink_class_case():
    """300 samples predicted as class 0, none confident (0.90); 10 of class 1 at 0.99."""
    labels = np.array([0] * 300 + [1] * 10)
    conf = np.array([0.90] * 300 + [0.99] * 10)
    return labels, conf


def test_kd3_sink_class_is_not_admitted_with_the_official_counts():
    labels, conf = sink_class_case()
    # official: N = (300, 10), s = (1, 1/30), tau_0 = 0.95: none of the 300 pass; tau_1 = 0.95/59 < 0.99
    thresholds = class_thresholds(labels, conf, 2)
    np.testing.assert_allclose(thresholds, [0.95, 0.95 * (1 / 30) / (2 - 1 / 30)])
    passes = passes_threshold(labels, conf, thresholds)
    assert passes[:300].sum() == 0 and passes[300:].all()
    # the earlier rule counted only predictions above tau: N = (0, 10), tau_0 = 0, all 300 walk in
    earlier = class_thresholds(labels, conf, 2, count="confident")
    np.testing.assert_allclose(earlier, [0.0, 0.95])
    assert passes_threshold(labels, conf, earlier)[:300].all()


def test_kd3_selection_policy_counts_every_prediction():
    labels, conf = sink_class_case()
    frame = pd.DataFrame({"sample_id": [f"s{i:03d}" for i in range(len(labels))],
                          "kd3_label": labels, "kd3_conf": conf})
    assert len(apply_policies(frame, parse_policy("kd3"))) == 10
    assert len(apply_policies(frame, parse_policy("kd3:count=confident"))) == 310


# --- KD^3 2: the combined prediction mixes logits -------------------------------------------------
def test_kd3_combined_prediction_mixes_logits():
    z_t, z_s = torch.tensor([[4.0, 0.0]]), torch.tensor([[-1.0, 1.0]])
    # official softmax(0.5 z_T + 0.5 z_S) = softmax([1.5, 0.5]): sigmoid(1) = 0.731
    label, conf = combined_prediction(z_t, z_s, 0.5)
    assert label.item() == 0 and conf.item() == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-6)
    # the earlier rule: 0.5 * sigmoid(4) + 0.5 * sigmoid(-2) = 0.550, far below tau
    label, conf = combined_prediction(z_t, z_s, 0.5, mix="probabilities")
    expected = 0.5 / (1 + math.exp(-4)) + 0.5 / (1 + math.exp(2))
    assert label.item() == 0 and conf.item() == pytest.approx(expected, rel=1e-6)


# --- KD^3 3: the loss is weighted feature MSE + 0.001 NT-Xent, no Hinton term ---------------------
def test_kd3_official_loss_has_no_kd_term():
    d = kd3()
    assert d.term_weights == {"kd": 0.0, "align": 1.0, "ntxent": 0.001, "ce": 0.0}
    _, terms = d.forward_train(images())
    assert set(terms) == {"align", "ntxent"}
    # the KD term a student without teacher features may want: one weight away, or the earlier variant
    assert "kd" in kd3(weights={"kd": 1.0}).forward_train(images())[1]
    assert kd3(variant="webdistill").term_weights["kd"] == 1.0


# --- KD^3 4: spatial feature alignment ------------------------------------------------------------
def test_kd3_aligns_the_projector_map_with_the_teachers_map_by_hand():
    d = kd3(select=False, weights={"ntxent": 0.0})
    x = images()
    _, terms = d.forward_train(x)
    with torch.no_grad():  # train mode, the same batch: the same BN batch statistics as the step
        map_s = d.projector(d.student.forward_features(x)).double()
        map_t = d.teacher.forward_features(x).double()
        z_s, z_t = d.deployable()(x).double(), d.teacher(x).double()
    assert map_s.shape == map_t.shape and map_s.ndim == 4 and map_s.shape[-1] > 1  # (B, C, H, W)
    w = torch.sigmoid((z_s - z_t).norm(dim=1))
    expected = (w * (map_s - map_t).pow(2).mean(dim=(1, 2, 3))).mean()  # the official weight_mse_loss
    assert terms["align"].item() == pytest.approx(expected.item(), rel=1e-4)
    pooled = kd3(select=False, align="pooled", weights={"ntxent": 0.0}).forward_train(x)[1]["align"]
    assert pooled.item() < terms["align"].item()  # pooling averages the spatial differences away


def test_kd3_spatial_alignment_pools_the_larger_map_to_the_smaller():
    big, small = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)
    a, b = same_size(big, small)
    torch.testing.assert_close(a, F.adaptive_avg_pool2d(big, 4))
    torch.testing.assert_close(b, small)
    a, b = same_size(small, big)
    torch.testing.assert_close(a, small)
    torch.testing.assert_close(b, F.adaptive_avg_pool2d(big, 4))
    z = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(alignment_weights(z, torch.zeros(2, 2)), torch.sigmoid(torch.tensor([3.0, 0.0])))


# --- KD^3 5: thresholds from a full eval-mode pass over the pool, each epoch ----------------------
def test_kd3_thresholds_come_from_an_eval_mode_pass_over_the_pool():
    d = kd3()
    d.forward_train(images(16, seed=3))  # BN running statistics move: train and eval mode now differ
    pool = [images(8, seed=10), images(5, seed=11)]
    d.on_epoch_start(0, 20, PoolPass(lambda: iter(pool), lambda t: t * 2))  # two ranks with equal shares
    assert d.training and d.student.training and not d.teacher.training  # back in train mode after the pass
    a = combine_weight(0, 20)
    with torch.no_grad():
        d.eval()
        labels = torch.cat([combined_prediction(d.teacher(x), d.deployable()(x), a)[0] for x in pool]).numpy()
        d.train()
    counts = np.bincount(labels, minlength=10)
    assert d.class_counts.tolist() == (2 * counts).tolist()  # every prediction, summed over ranks
    s = counts / counts.max()
    np.testing.assert_allclose(d.thresholds.numpy(), 0.95 * s / (2 - s), rtol=1e-6)
    assert (d.thresholds < 0.95).any()  # epoch 0 already has class-adaptive thresholds, not tau everywhere
    # training batches no longer move the counts (the earlier variant counted them for the next epoch)
    d.forward_train(images())
    d.on_epoch_end(lambda t: t)
    assert d.class_counts.tolist() == (2 * counts).tolist()


# --- KD^3 6: the contrastive head and a(e) ---------------------------------------------------------
def test_kd3_contrastive_head_is_one_linear_on_the_students_own_features():
    d = kd3(select=False, weights={"align": 0.0})
    assert isinstance(d.head_student, torch.nn.Linear) and d.head_student.weight.shape == (128, 32)  # d_S = 32
    assert isinstance(d.head_teacher, torch.nn.Linear) and d.head_teacher.weight.shape == (128, 64)  # d_T = 64
    _, terms = d.forward_train(images())
    student = [p for p in d.student.parameters() if p.requires_grad]  # its own classifier is frozen
    grads = torch.autograd.grad(terms["ntxent"], list(d.projector.parameters()) + student, allow_unused=True)
    n_proj = len(list(d.projector.parameters()))
    assert all(g is None for g in grads[:n_proj])  # before the projector: the projector learns nothing from it
    assert any(g is not None and g.abs().sum() > 0 for g in grads[n_proj:])
    earlier = kd3(variant="webdistill")
    assert isinstance(earlier.head_student, torch.nn.Sequential) and earlier.head_student[0].in_features == 64


def time_d(epoch, max_epoch):
    """The official schedule (KDDD/helper/util.py), epochs counted from 1."""
    return 1 - math.exp(-5 * ((epoch + 1) / 160 - 1) ** 2) if epoch < max_epoch else 0.0


def test_kd3_teacher_weight_follows_the_official_epochs():
    # webdistill's epoch e (from 0) is the official loop's epoch e + 1
    for e in (0, 1, 59, 118, 119, 239):
        assert combine_weight(e, 240) == pytest.approx(time_d(e + 1, 120), abs=1e-12)
    assert combine_weight(119, 240) == 0.0 < combine_weight(118, 240)


# --- SAKD 1: every stage is a spot, the last included ----------------------------------------------
def force_distil(d):
    with torch.no_grad():
        d.policy.weight.zero_()
        d.policy.bias.copy_(torch.tensor([100.0, -100.0] * d.n_spots))


def test_sakd_at_distils_every_stage_the_last_included():
    d = sakd(weights={"policy": 0.0, "ce": 0.0, "kd": 0.0})
    assert d.spots == [0, 1, 2] and d.n_spots == 4  # 3 stages + the output
    force_distil(d)
    x = images()
    _, terms = d.forward_train(x)
    feats_s, feats_t, xs, xt = [], [], x, x
    with torch.no_grad():
        for s_stage, t_stage in zip(d.student.stages(), d.teacher.stages()):
            xs, xt = s_stage(xs), t_stage(xt)
            feats_s.append(xs)
            feats_t.append(xt)
    expected = 1000.0 * sum(at_per_sample(fs, ft).mean() for fs, ft in zip(feats_s, feats_t))
    assert terms["at"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert sakd(variant="webdistill").spots == [0, 1]  # the earlier choice left the last stage out


# --- SAKD 2: student CE at weight 1 (pseudo-labels), +10 for same-family pairs --------------------
def test_sakd_student_ce_on_the_teachers_pseudo_labels():
    d = sakd().eval()
    x = images()
    _, terms = d.forward_train(x)
    with torch.no_grad():
        z_s, z_t = d.student(x), d.teacher(x)
    assert d.term_weights["ce"] == 1.0
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(z_s, z_t.argmax(1)).item(), rel=1e-5)
    assert "ce" not in sakd(variant="webdistill").forward_train(x)[1]


def test_sakd_same_family_pairs_start_distilling_nearly_everywhere():
    same, other = sakd(), sakd(same_family=False)  # two SmallCNNs: the same family by default
    diff = (same.policy.bias - other.policy.bias).detach()
    torch.testing.assert_close(diff, torch.tensor([10.0, 0.0] * same.n_spots))
    torch.manual_seed(0)
    distil = same.decide(torch.randn(256, 64), torch.randn(256, 32))[..., 0]
    assert distil.mean().item() > 0.99
    torch.manual_seed(0)
    assert other.decide(torch.randn(256, 64), torch.randn(256, 32))[..., 0].mean().item() < 0.8


# --- SAKD 3: the policy's own optimizer settings, one feature method + KD per config ---------------
def test_sakd_policy_and_adapters_train_at_half_the_rate_with_their_own_weight_decay():
    d = sakd()
    student_group, agent_group = d.optimizer_groups()
    agent = {id(p) for m in (d.policy, d.hints, d.anti_hints) for p in m.parameters()}
    assert {id(p) for p in agent_group["params"]} == agent
    assert not agent & {id(p) for p in student_group["params"]}
    cfg = SimpleNamespace(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt = make_optimizer(cfg, d.optimizer_groups())
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.05, 5e-4), (0.025, 1e-3)]
    set_lr(opt, 0.01)  # the job's schedule, scaled per group
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.005]
    assert len(sakd(variant="webdistill").optimizer_groups()) == 2
    earlier = make_optimizer(cfg, sakd(variant="webdistill").optimizer_groups())
    assert [(g["lr"], g["weight_decay"]) for g in earlier.param_groups] == [(0.05, 5e-4), (0.05, 5e-4)]


def test_sakd_one_feature_method_with_its_gamma():
    at = sakd()
    assert at.params["wraps"] == ["at", "kd"] and at.gamma == 2.0
    fitnet = sakd(wraps=["fitnet", "kd"])
    assert fitnet.gamma == 1.0 and fitnet.spots == [1] and fitnet.policy.out_features == 4  # official: 4 outputs
    force_distil(fitnet)
    assert fitnet.forward_train(images())[1]["fitnet"].item() > 0
    earlier = sakd(variant="webdistill")
    assert earlier.params["wraps"] == ["fitnet", "at", "kd"] and earlier.gamma == 2.0
