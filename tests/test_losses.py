"""The distillation losses (distill/losses): values against hand computations on tiny tensors, the
frozen teacher, SAKD's gradient routing and decisions, KD^3's selection schedule and its deployable
student, sample weights and config errors."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from distill.kd3_rules import passes_threshold
from distill.losses import LOSSES, LossConfigError, build_distiller
from distill.losses.kd3 import alignment_weights, mix_style, nt_xent_per_sample
from distill.losses.sakd import at_per_sample
from distill.models import mnist_teacher, tiny_student

torch.set_num_threads(1)


def softmax(z, axis=1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def models(seed=0):
    torch.manual_seed(seed)
    return tiny_student(10), mnist_teacher(10)


def images(n=8, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# Logits stand in for images with an identity student: the loss sees exactly these student logits.
Z_S = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]], dtype=np.float32)
Z_T = np.array([[3.0, 0.0, 1.0], [0.5, 0.5, 4.0], [1.0, 0.0, -2.0]], dtype=np.float32)


def logit_terms(config, z_s=Z_S, z_t=Z_T, sample_weights=None):
    distiller = build_distiller(config, nn.Identity(), None, 3)
    w = None if sample_weights is None else torch.tensor(sample_weights, dtype=torch.float32)
    _, terms = distiller.forward_train(torch.tensor(z_s), torch.tensor(z_t).half(), w)
    return {k: float(v) for k, v in terms.items()}


def hand_kd(z_s, z_t, T):
    p_t, p_s = softmax(z_t / T), softmax(z_s / T)
    return (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1) * T * T


# --- logit losses -----------------------------------------------------------------------------
def test_kd_at_temperature_matches_hand_computation():
    for T in (1.0, 4.0):
        assert logit_terms({"method": "kd", "T": T})["kd"] == pytest.approx(hand_kd(Z_S, Z_T, T).mean(), rel=1e-4)


def test_logit_mse_option():
    terms = logit_terms({"method": "kd", "mse": True, "weights": {"kd": 2.0}})
    assert terms["kd"] == pytest.approx(2.0 * ((Z_S - Z_T) ** 2).mean(), rel=1e-5)


def test_confidence_weighted_kd_weights_each_sample_by_teacher_msp():
    conf = softmax(Z_T).max(axis=1)
    expected = (conf * hand_kd(Z_S, Z_T, 2.0)).mean()
    assert logit_terms({"method": "confidence_weighted", "T": 2})["kd"] == pytest.approx(expected, rel=1e-4)


def test_pseudo_label_ce():
    labels = Z_T.argmax(axis=1)
    expected = -np.log(softmax(Z_S)[np.arange(3), labels]).mean()
    assert logit_terms({"method": "ce"})["ce"] == pytest.approx(expected, rel=1e-5)


def test_sample_weights_weighted_mean_and_zero_weight_sample_ignored():
    w = [1.0, 0.0, 3.0]
    per_sample = hand_kd(Z_S, Z_T, 4.0)
    assert logit_terms({"method": "kd"}, sample_weights=w)["kd"] == pytest.approx(
        (per_sample * w).sum() / 4.0, rel=1e-4)
    garbage_s, garbage_t = Z_S.copy(), Z_T.copy()
    garbage_s[1], garbage_t[1] = [50.0, -50.0, 9.0], [-40.0, 30.0, 0.0]
    for method in ("kd", "confidence_weighted", "ce"):
        with_zero = logit_terms({"method": method}, garbage_s, garbage_t, w)
        without = logit_terms({"method": method}, Z_S[[0, 2]], Z_T[[0, 2]], [1.0, 3.0])
        assert with_zero == pytest.approx(without, rel=1e-5)


def test_extra_methods_combine_as_weighted_terms():
    terms = logit_terms({"method": "kd", "T": 4.0,
                         "extra": [{"method": "confidence_weighted", "T": 2.0, "weight": 0.5}]})
    conf = softmax(Z_T).max(axis=1)
    assert set(terms) == {"kd", "confidence_weighted.kd"}
    assert terms["confidence_weighted.kd"] == pytest.approx(0.5 * (conf * hand_kd(Z_S, Z_T, 2.0)).mean(), rel=1e-4)


def test_zero_weight_terms_are_not_returned():
    terms = logit_terms({"method": "kd", "weights": {"kd": 0}, "extra": [{"method": "ce"}]})
    assert set(terms) == {"ce.ce"}


# --- feature losses, by hand ------------------------------------------------------------------
def test_attention_transfer_matches_hand_computation():
    rng = np.random.default_rng(0)
    f_s, f_t = rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 5, 2, 2))

    def att(f):
        a = (f ** 2).mean(axis=1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected = ((att(f_s) - att(f_t)) ** 2).mean(axis=1)
    got = at_per_sample(torch.tensor(f_s), torch.tensor(f_t)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_alignment_weights_are_sigmoid_of_logit_distance_and_detached():
    z_s = torch.tensor(Z_S, requires_grad=True)
    w = alignment_weights(z_s, torch.tensor(Z_T))
    expected = 1 / (1 + np.exp(-np.linalg.norm(Z_S - Z_T, axis=1)))
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)
    assert not w.requires_grad


def hand_nt_xent(a, b, t):
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n, losses = len(a), []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = [z[i] @ z[k] / t for k in range(2 * n) if k != i]
        losses.append(-z[i] @ z[pos] / t + np.log(np.sum(np.exp(sims))))
    losses = np.array(losses)
    return (losses[:n] + losses[n:]) / 2


def test_nt_xent_matches_hand_computation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    got = nt_xent_per_sample(torch.tensor(a), torch.tensor(b), 0.3).numpy()
    np.testing.assert_allclose(got, hand_nt_xent(a, b, 0.3), rtol=1e-6)


def test_nt_xent_zero_weight_sample_is_not_a_negative_either():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    got = nt_xent_per_sample(torch.tensor(a), torch.tensor(b), 0.3, torch.tensor([1.0, 0.0, 2.0])).numpy()
    np.testing.assert_allclose(got[[0, 2]], hand_nt_xent(a[[0, 2]], b[[0, 2]], 0.3), rtol=1e-6)


def test_mix_style_gives_the_lambda_mixture_of_channel_statistics():
    rng = np.random.default_rng(3)
    x = rng.normal(loc=rng.normal(size=(4, 3, 1, 1)), scale=rng.uniform(0.5, 2, size=(4, 3, 1, 1)),
                   size=(4, 3, 8, 8)).astype(np.float32)
    lam, perm = np.array([0.0, 0.3, 1.0, 0.9], dtype=np.float32), np.array([2, 0, 3, 1])
    mixed = mix_style(torch.tensor(x), torch.tensor(lam), torch.tensor(perm)).numpy()
    mu, sd = x.mean(axis=(2, 3)), x.std(axis=(2, 3))
    lam = lam[:, None]
    np.testing.assert_allclose(mixed.mean(axis=(2, 3)), lam * mu + (1 - lam) * mu[perm], atol=1e-5)
    np.testing.assert_allclose(mixed.std(axis=(2, 3)), lam * sd + (1 - lam) * sd[perm], rtol=1e-4)


# --- the frozen teacher -----------------------------------------------------------------------
@pytest.mark.parametrize("config", [{"method": "kd"}, {"method": "confidence_weighted"},
                                    {"method": "kd3", "select": False}, {"method": "sakd"}])
def test_teacher_stays_frozen(config):
    student, teacher = models()
    distiller = build_distiller(config, student, teacher, 10)
    distiller.train()
    assert not teacher.training
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_ids = {id(p) for p in teacher.parameters()}
    params = distiller.trainable_parameters()
    assert params and not teacher_ids & {id(p) for p in params}
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        _, terms = distiller.forward_train(images())
        sum(terms.values()).backward()
        assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
    for k, v in teacher.state_dict().items():  # weights and BN running statistics
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())


# --- SAKD ---------------------------------------------------------------------------------------
def sakd(weights=None, **params):
    student, teacher = models()
    return build_distiller({"method": "sakd", **params, "weights": weights or {}}, student, teacher, 10).train()


def test_sakd_policy_gradient_comes_only_from_the_policy_loss():
    d = sakd()
    _, terms = d.forward_train(images())
    policy = list(d.policy.parameters())
    others = sum(v for k, v in terms.items() if k != "policy")
    assert all(g is None for g in torch.autograd.grad(others, policy, allow_unused=True, retain_graph=True))
    from_policy = torch.autograd.grad(terms["policy"], policy + list(d.student.parameters()),
                                      allow_unused=True, retain_graph=True)
    assert all(g is not None and g.abs().sum() > 0 for g in from_policy[:2])
    assert all(g is None for g in from_policy[2:])  # the student learns nothing from the policy loss


def test_sakd_policy_gets_no_gradient_when_its_weight_is_zero():
    d = sakd({"policy": 0.0})
    _, terms = d.forward_train(images())
    assert "policy" not in terms
    sum(terms.values()).backward()
    assert all(p.grad is None for p in d.policy.parameters())
    assert not {id(p) for p in d.policy.parameters()} & {id(p) for p in d.trainable_parameters()}
    d = sakd({"policy": 1.0})
    _, terms = d.forward_train(images())
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.policy.parameters())


def test_sakd_decisions_are_hard_one_hot_with_straight_through_gradient():
    d = sakd(same_family=False)
    torch.manual_seed(0)
    decisions = d.decide(torch.randn(32, 64), torch.randn(32, 32))
    assert decisions.shape == (32, d.n_spots, 2) == (32, 4, 2)  # 3 stages (the last included) + the output
    assert set(decisions.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(decisions.sum(dim=-1), torch.ones(32, 4))
    (grad,) = torch.autograd.grad((decisions[..., 0] * torch.arange(4.0)).sum(), d.policy.weight)
    assert grad.abs().sum() > 0


def force_decisions(d, distil: bool):
    """A policy whose logits favour one choice by 100 at temperature 5: Gumbel noise cannot flip it."""
    with torch.no_grad():
        d.policy.weight.zero_()
        d.policy.bias.copy_(torch.tensor([100.0, -100.0] * d.n_spots) * (1 if distil else -1))


def test_sakd_distils_only_at_chosen_spots():
    x = images()
    d = sakd(wraps=["fitnet", "at", "kd"], weights={"policy": 0.0})
    force_decisions(d, distil=False)
    _, terms = d.forward_train(x)
    assert all(terms[t].item() == 0.0 for t in ("fitnet", "at", "kd"))
    force_decisions(d, distil=True)
    _, terms = d.forward_train(x)
    assert all(terms[t].item() > 0 for t in ("fitnet", "at", "kd"))
    with torch.no_grad():
        z_s, z_t = d.student(x), d.teacher(x)
    expected = hand_kd(z_s.numpy().astype(np.float64), z_t.numpy().astype(np.float64), 4.0).mean()
    assert terms["kd"].item() == pytest.approx(expected, rel=1e-4)


def hand_ce(z, labels):
    z = z.astype(np.float64)
    return -np.log(softmax(z)[np.arange(len(z)), labels]).mean()


def test_sakd_policy_loss_by_hand():
    x = images()
    d = sakd(gamma=2.0).eval()  # eval: the student's own forward and the graft both use BN running stats
    with torch.no_grad():
        z_s, z_t = d.student(x).numpy(), d.teacher(x).numpy()
    labels = z_t.argmax(axis=1)
    force_decisions(d, distil=False)  # the graft is the student itself: equal CE, no scaling; nobody distilled
    _, terms = d.forward_train(x)
    assert terms["policy"].item() == pytest.approx(hand_ce(z_s, labels) + len(x) / 2, rel=1e-4)
    force_decisions(d, distil=True)   # the graft ends in the teacher's logits: a better CE, divided by gamma
    _, terms = d.forward_train(x)
    assert hand_ce(z_t, labels) < hand_ce(z_s, labels)
    assert terms["policy"].item() == pytest.approx(hand_ce(z_t, labels) / 2.0, rel=1e-4)


# --- KD^3 ---------------------------------------------------------------------------------------
def kd3(**params):
    student, teacher = models()
    return build_distiller({"method": "kd3", **params}, student, teacher, 10).train()


def test_kd3_combine_weight_schedule():
    d = kd3()
    # the official time_d(epoch, 120) with 1-based epochs: 1 - exp(-5((epoch + 1)/160 - 1)^2) while epoch < 120
    expected = {e - 1: 1 - math.exp(-5 * ((e + 1) / 160 - 1) ** 2) if e < 120 else 0.0 for e in (1, 60, 119, 120, 200)}
    for e, a in expected.items():
        d.on_epoch_start(e, 240)
        assert float(d.teacher_weight) == pytest.approx(a, abs=1e-6)
    assert [round(expected[e], 2) for e in (0, 59, 118, 119)] == [0.99, 0.85, 0.27, 0.0]
    fixed = kd3(epochs=240)  # the config's schedule length wins over the job's
    fixed.on_epoch_start(59, 10)
    assert float(fixed.teacher_weight) == pytest.approx(expected[59], abs=1e-6)


@pytest.mark.parametrize("variant", ["official", "webdistill"])
def test_kd3_batch_mask_is_passes_threshold_on_the_combined_prediction(variant):
    d = kd3(variant=variant)
    d.on_epoch_start(30, 100)
    a = float(d.teacher_weight)
    rng = np.random.default_rng(4)
    thresholds = rng.uniform(0.1, 0.6, 10).astype(np.float32)
    d.thresholds.copy_(torch.tensor(thresholds))
    z_t, z_s = rng.normal(scale=3, size=(64, 10)), rng.normal(scale=3, size=(64, 10))
    # official: logits mixed; webdistill's earlier variant: probabilities mixed
    p = softmax(a * z_t + (1 - a) * z_s) if variant == "official" else a * softmax(z_t) + (1 - a) * softmax(z_s)
    expected = passes_threshold(p.argmax(axis=1), p.max(axis=1), thresholds)
    assert 0 < expected.sum() < 64
    mask = d.selection_mask(torch.tensor(z_t, dtype=torch.float32), torch.tensor(z_s, dtype=torch.float32))
    np.testing.assert_array_equal(mask.numpy(), expected)


def test_kd3_counts_over_the_epoch_give_next_epochs_thresholds():
    """webdistill's earlier variant: confident predictions of the training batches set the next epoch's thresholds."""
    d = kd3(tau=0.9, variant="webdistill")
    d.on_epoch_start(0, 10)
    confident = torch.full((7, 10), -10.0)
    labels = [0, 0, 0, 0, 1, 1, 2]                   # N = [4, 2, 1, 0, ...] per rank
    confident[range(7), labels] = 10.0
    unsure = torch.zeros(3, 10)                       # conf 0.1: not counted
    for batch in (confident, unsure):
        d.selection_mask(batch, batch)
    d.on_epoch_end(lambda t: t * 2)                   # two ranks with the same counts
    assert d.class_counts.tolist() == [8, 4, 2] + [0] * 7
    s = np.array([8, 4, 2] + [0] * 7) / 8
    np.testing.assert_allclose(d.thresholds.numpy(), 0.9 * s / (2 - s), rtol=1e-6)
    restored = kd3(tau=0.9, variant="webdistill")     # the thresholds survive a checkpoint
    restored.load_state_dict(d.state_dict())
    assert torch.equal(restored.thresholds, d.thresholds)


def test_kd3_weighted_feature_alignment_by_hand():
    """`align: pooled` (webdistill's earlier variant); the official spatial alignment: test_methods_fidelity."""
    d = kd3(select=False, align="pooled", weights={"kd": 0.0, "align": 1.0, "ntxent": 0.0})
    x = images()
    _, terms = d.forward_train(x)
    with torch.no_grad():
        f_s = d.deployable().embed(x).numpy().astype(np.float64)   # same batch: same BN batch statistics
        f_t = d.teacher.embed(x).numpy().astype(np.float64)
        classifier = d.teacher.classifier
        w_cls, b_cls = classifier.weight.numpy().astype(np.float64), classifier.bias.numpy().astype(np.float64)
    z_s, z_t = f_s @ w_cls.T + b_cls, f_t @ w_cls.T + b_cls
    w = 1 / (1 + np.exp(-np.linalg.norm(z_s - z_t, axis=1)))
    assert terms["align"].item() == pytest.approx((w[:, None] * (f_s - f_t) ** 2).mean(), rel=1e-4)


def test_kd3_terms_and_selection_zero_out_unselected_samples():
    d = kd3()
    _, terms = d.forward_train(images())
    assert set(terms) == {"align", "ntxent"}  # the official loss: no KD term
    assert set(kd3(variant="webdistill").forward_train(images())[1]) == {"kd", "align", "ntxent"}
    d.thresholds.fill_(1.0)  # nothing can pass: every term is 0, and finite
    _, terms = d.forward_train(images())
    assert all(v.item() == 0.0 for v in terms.values())


def test_kd3_deployable_scripts_and_traces_to_the_same_logits():
    d = kd3()
    d.forward_train(images())  # BN statistics move off their initial values
    d.eval()
    dep = d.deployable()
    assert dep.classifier is d.teacher.classifier
    x = images(4, seed=5)
    with torch.no_grad():
        eager = dep(x)
        torch.testing.assert_close(d(x), eager)
        with pytest.warns(FutureWarning):  # torch 2.14 deprecates TorchScript; it still works
            scripted, traced = torch.jit.script(dep), torch.jit.trace(dep, x)
        torch.testing.assert_close(scripted(x), eager)
        torch.testing.assert_close(traced(x), eager)


# --- the stage API and configs --------------------------------------------------------------------
def test_stage_api_composes_to_forward_features_and_keeps_state_dict_keys():
    _, teacher = models()
    teacher.eval()
    x, y = images(), images()
    for stage in teacher.stages():
        y = stage(y)
    torch.testing.assert_close(y, teacher.forward_features(x))
    torch.testing.assert_close(teacher.head()(y), teacher(x))
    assert teacher.stage_channels == (16, 32, 64)
    assert {k.split(".")[0] for k in teacher.state_dict()} == {"features", "classifier"}


def test_registry_and_live_teacher_flags():
    assert {"kd", "kd3", "sakd", "confidence_weighted", "ce"} <= set(LOSSES)
    assert not LOSSES["kd"].needs_live_teacher and LOSSES["kd3"].needs_live_teacher


def test_term_names_match_the_returned_terms():
    student, teacher = models()
    for config in ({"method": "kd", "extra": [{"method": "ce", "weight": 0.1}]}, {"method": "kd3", "select": False},
                   {"method": "sakd", "wraps": ["at", "kd"], "weights": {"ce": 0.5}}):
        d = build_distiller(config, student, teacher, 10)
        _, terms = d.forward_train(images())
        assert list(terms) == d.term_names()


@pytest.mark.parametrize("config, teacher, message", [
    ({"method": "nope"}, True, "unknown loss method 'nope'"),
    ({"method": "kd", "Tau": 2}, True, "unknown parameter 'Tau'"),
    ({"method": "kd", "T": "hot"}, True, "parameter 'T' must be float"),
    ({"method": "kd", "T": 0}, True, "T must be > 0"),
    ({"method": "kd", "mse": 1}, True, "parameter 'mse' must be bool"),
    ({"method": "kd", "weights": {"feat": 1}}, True, "unknown term 'feat'"),
    ({"method": "kd", "weights": {"kd": -1}}, True, "must be >= 0"),
    ({"method": "kd3"}, False, "needs a live teacher (teacher_mode: live)"),
    ({"method": "sakd"}, False, "needs a live teacher (teacher_mode: live)"),
    ({"method": "kd3", "tau": 1.5}, True, "tau must be in (0, 1)"),
    ({"method": "sakd", "wraps": ["fitnet", "crd"]}, True, "wraps must list"),
    ({"method": "sakd", "wraps": ["kd"], "weights": {"at": 5}}, True, "'at' is not in wraps"),
    ({"method": "kd", "extra": [{"method": "kd3"}]}, True, "cannot be an extra"),
    ({"method": "kd", "extra": [{"method": "ce", "weight": -2}]}, True, "'weight' must be a number >= 0"),
    ({"method": "kd", "extra": {"method": "ce"}}, True, "'extra' must be a list"),
    ({"method": "kd", "weights": {"kd": 0}}, True, "every term has weight 0"),
    ("kd", True, "must be a mapping"),
])
def test_bad_configs_raise_loss_config_error(config, teacher, message):
    student, t = models()
    with pytest.raises(LossConfigError) as err:
        build_distiller(config, student, t if teacher else None, 10)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_feature_methods_refuse_a_teacher_without_the_feature_api():
    student, _ = models()
    with pytest.raises(LossConfigError, match="forward_features"):
        build_distiller({"method": "kd3"}, student, nn.Sequential(nn.Flatten(), nn.Linear(768, 10)), 10)


def test_stored_logits_are_needed_without_a_live_teacher():
    student, _ = models()
    d = build_distiller({"method": "kd"}, student, None, 10)
    with pytest.raises(LossConfigError, match="stored teacher logits or a live teacher"):
        d.forward_train(images())
