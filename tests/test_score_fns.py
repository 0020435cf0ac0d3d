"""Per-sample OOD / agreement scores (curation/score_fns.py) against values worked out by hand
(literal numbers or explicit numpy formulas) on tiny tensors and tiny hand-built models."""
import math

import numpy as np
import pytest
import torch
import torchvision
from scipy.spatial.distance import mahalanobis
from torch import nn

from curation import score
from curation import score_fns as sf
from curation.feature_taps import PENULTIMATE, LayerNotFound, feature_taps
from curation.score import BatchScorer, ScoreConfig
from distill.models import tiny_student
from distill.spec import IMAGENET_MEAN, IMAGENET_STD

E2 = math.exp(2.0)
LN2 = math.log(2.0)


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def softmax_np(z) -> np.ndarray:
    e = np.exp(np.asarray(z, dtype=np.float64))
    return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------- logit scores

def test_msp_max_logit_energy_on_literal_logits():
    z = t64([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(sf.msp(z), [E2 / (E2 + 2), 1 / 3], rtol=1e-12)
    np.testing.assert_allclose(sf.max_logit(z), [2.0, 1.0])
    np.testing.assert_allclose(sf.energy(z), [math.log(E2 + 2), 1 + math.log(3)], rtol=1e-12)
    # T * logsumexp(z / T) at T = 2: 2 * log(e^1 + e^0 + e^0), and 2 * log(3 e^0.5) = 1 + 2 log 3
    np.testing.assert_allclose(sf.energy(z, 2.0), [2 * math.log(math.e + 2), 1 + 2 * math.log(3)], rtol=1e-12)


def test_neg_entropy_is_sum_p_log_p():
    z = t64([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, -1.0, 3.0]])
    p = softmax_np(z)
    np.testing.assert_allclose(sf.neg_entropy(z), (p * np.log(p)).sum(1), rtol=1e-12)
    assert sf.neg_entropy(z)[1].item() == pytest.approx(-math.log(3))  # uniform: the minimum, -ln C


def test_neg_entropy_and_kl_of_a_class_ruled_out_by_a_minus_inf_logit():
    z = t64([[2.0, 0.0, -math.inf]])
    q = t64([[0.0, 1.0, -math.inf]])
    # 0 log 0 = 0: the third class adds nothing, so the scores equal those of the first two classes
    assert sf.neg_entropy(z).item() == pytest.approx(sf.neg_entropy(z[:, :2]).item(), rel=1e-12)
    assert sf.kl_div(z, q).item() == pytest.approx(sf.kl_div(z[:, :2], q[:, :2]).item(), rel=1e-12)


def test_gen_over_the_top_m_probabilities():
    z = t64([[2.0, 0.0, 0.0]])
    p0, p1 = E2 / (E2 + 2), 1 / (E2 + 2)
    term = lambda p: p ** 0.1 * (1 - p) ** 0.1  # noqa: E731
    # top_m = 2 < C = 3: the largest two probabilities only
    assert sf.gen(z, gamma=0.1, top_m=2).item() == pytest.approx(-(term(p0) + term(p1)), rel=1e-12)
    # the default top_m (100) is more than C: every class
    assert sf.gen(z, gamma=0.1).item() == pytest.approx(-(term(p0) + 2 * term(p1)), rel=1e-12)
    # more confident -> higher (less generalised entropy)
    assert sf.gen(t64([[5.0, 0.0, 0.0]])).item() > sf.gen(z).item()


def test_kl_by_hand():
    zp, zq = t64([[2.0, 0.0, 0.0]]), t64([[0.0, 1.0, -1.0]])
    p, q = softmax_np(zp)[0], softmax_np(zq)[0]
    assert sf.kl_div(zp, zq).item() == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-12)
    assert sf.kl_div(zp, zp).item() == pytest.approx(0.0, abs=1e-15)
    assert sf.kl_div(zp, zq).item() != pytest.approx(sf.kl_div(zq, zp).item())  # KL is not symmetric


def test_js_by_hand_symmetric_zero_and_bounded_by_ln2():
    zp, zq = t64([[2.0, 0.0, 0.0]]), t64([[0.0, 1.0, -1.0]])
    p, q = softmax_np(zp)[0], softmax_np(zq)[0]
    m = (p + q) / 2
    by_hand = 0.5 * (p * np.log(p / m)).sum() + 0.5 * (q * np.log(q / m)).sum()
    assert sf.js_div(zp, zq).item() == pytest.approx(float(by_hand), rel=1e-12)
    assert sf.js_div(zq, zp).item() == pytest.approx(sf.js_div(zp, zq).item(), rel=1e-12)
    assert sf.js_div(zp, zp).item() == pytest.approx(0.0, abs=1e-15)
    # disjoint distributions reach ln 2; random pairs stay below it
    assert sf.js_div(t64([[60.0, 0.0]]), t64([[0.0, 60.0]])).item() == pytest.approx(LN2, rel=1e-9)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 5, generator=g) * 4, torch.randn(200, 5, generator=g) * 4
    js = sf.js_div(a, b)
    assert (js >= 0).all() and (js <= LN2 + 1e-6).all()


# ---------------------------------------------------------------- KD^3 combined prediction

def test_combined_prediction_mixes_logits_as_the_official_code():
    p_t, p_s = np.array([0.5, 0.4, 0.1]), np.array([0.1, 0.4, 0.5])
    zt, zs = t64(np.log(p_t)[None]), t64(np.log(p_s)[None])
    # a = 0.5: softmax(0.5 log p_T + 0.5 log p_S) = sqrt(p_T p_S) normalised = [0.2236, 0.4, 0.2236] / 0.8472
    label, conf = sf.combined_prediction(zt, zs, 0.5)
    assert label.tolist() == [1] and conf.item() == pytest.approx(0.4 / (0.4 + 2 * math.sqrt(0.05)), rel=1e-12)
    # a = 0.8: p_T^0.8 p_S^0.2 normalised = [0.362, 0.4, 0.138] / 0.900: still class 1 (mixing
    # probabilities would give the teacher's class 0, below)
    g = p_t ** 0.8 * p_s ** 0.2
    label, conf = sf.combined_prediction(zt, zs, 0.8)
    assert label.tolist() == [1] and conf.item() == pytest.approx(0.4 / g.sum(), rel=1e-12)


def test_combined_prediction_can_mix_probabilities():
    """webdistill's earlier rule (`mix="probabilities"`)."""
    p_t, p_s = np.array([0.5, 0.4, 0.1]), np.array([0.1, 0.4, 0.5])
    zt, zs = t64(np.log(p_t)[None]), t64(np.log(p_s)[None])
    # a = 0.5: [0.3, 0.4, 0.3] -> class 1, which neither model predicts alone
    label, conf = sf.combined_prediction(zt, zs, 0.5, mix="probabilities")
    assert label.tolist() == [1] and conf.item() == pytest.approx(0.4, rel=1e-12)
    # a = 0.8: 0.8 p_T + 0.2 p_S = [0.42, 0.40, 0.18]
    label, conf = sf.combined_prediction(zt, zs, 0.8, mix="probabilities")
    assert label.tolist() == [0] and conf.item() == pytest.approx(0.42, rel=1e-12)


def test_combined_prediction_without_student_is_the_teacher():
    zt = t64([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    label, conf = sf.combined_prediction(zt, None, 0.3)  # alpha plays no part without a student
    assert label.tolist() == [0, 2]
    np.testing.assert_allclose(conf, [E2 / (E2 + 2), math.exp(3) / (math.exp(3) + 2)], rtol=1e-12)


# ---------------------------------------------------------------- ODIN

def linear_model() -> nn.Module:
    """logits = W x on a 2-channel 1x1 image, W = [[2, 0], [0, 1], [1, -1]]."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 3, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(t64([[2.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
    return model


ODIN_X = t64([[1.0, -0.5], [-1.0, 1.0]]).view(2, 2, 1, 1)
ODIN_STD = (0.5, 0.25)
# By hand, T = 2, eps = 0.1, step = eps / std = (0.2, 0.4). The gradient of -log softmax_k(Wx/T) is
# W^T (p - e_k) / T.
# Sample 0: z = (2, -0.5, 1.5), k = 0: grad = (-(2 p1 + p2), p1 - p2) / T, signs (-, -) since p2 > p1,
#   so x' = x + (0.2, 0.4) = (1.2, -0.1), z' = (2.4, -0.1, 1.3).
# Sample 1: z = (-2, 1, -2), k = 1: grad = (2 p0 + p2, p1 - 1 - p2) / T, signs (+, -),
#   so x' = x + (-0.2, 0.4) = (-1.2, 1.4), z' = (-2.4, 1.4, -2.6).
ODIN_PERTURBED_LOGITS = [[2.4, -0.1, 1.3], [-2.4, 1.4, -2.6]]
ODIN_CLASS = [0, 1]


def odin_by_hand(temperature: float) -> np.ndarray:
    p = softmax_np(np.array(ODIN_PERTURBED_LOGITS) / temperature)
    return p[np.arange(2), ODIN_CLASS]


def test_odin_moves_the_input_to_raise_the_predicted_class():
    model, x = linear_model(), ODIN_X.clone()
    score = sf.odin(model, x, ODIN_STD, temperature=2.0, epsilon=0.1)
    np.testing.assert_allclose(score, odin_by_hand(2.0), rtol=1e-12)
    unperturbed = softmax_np(np.array([[2.0, -0.5, 1.5], [-2.0, 1.0, -2.0]]) / 2.0).max(1)
    assert (score.numpy() > unperturbed).all()
    # the literal check of the first sample: e^1.2 / (e^1.2 + e^-0.05 + e^0.65)
    assert score[0].item() == pytest.approx(math.exp(1.2) / (math.exp(1.2) + math.exp(-0.05) + math.exp(0.65)))
    assert torch.equal(x, ODIN_X)  # the caller's input is untouched
    assert model[1].weight.grad is None  # only the input's gradient is taken


def test_odin_works_inside_no_grad_with_frozen_weights():
    model = linear_model()
    model.requires_grad_(False)  # as the score stage loads the teacher
    with torch.no_grad():
        score = sf.odin(model, ODIN_X, ODIN_STD, temperature=2.0, epsilon=0.1)
    np.testing.assert_allclose(score, odin_by_hand(2.0), rtol=1e-12)


def test_odin_with_zero_epsilon_is_the_temperature_scaled_msp():
    score = sf.odin(linear_model(), ODIN_X, ODIN_STD, temperature=1000.0, epsilon=0.0)
    expected = softmax_np(np.array([[2.0, -0.5, 1.5], [-2.0, 1.0, -2.0]]) / 1000.0).max(1)
    np.testing.assert_allclose(score, expected, rtol=1e-12)


# ---------------------------------------------------------------- BatchNorm-statistics score

GAMMA, BETA = (2.0, 0.5), (1.0, -1.0)
RUN_MEAN, RUN_VAR = (3.0, -2.0), (4.0, 0.25)


def set_bn(bn: nn.modules.batchnorm._BatchNorm, gamma, beta, mean, var) -> nn.Module:
    with torch.no_grad():
        bn.weight.copy_(t64(gamma))
        bn.bias.copy_(t64(beta))
        bn.running_mean.copy_(t64(mean))
        bn.running_var.copy_(t64(var))
    bn.eps = 0.0  # so u is exactly (x - mean) / sqrt(var)
    return bn.eval()


def bn_model() -> nn.Module:
    return nn.Sequential(set_bn(nn.BatchNorm2d(2).double(), GAMMA, BETA, RUN_MEAN, RUN_VAR))


def bn_score(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The score as the score stage computes it: BatchNorm outputs pooled by the feature taps."""
    taps = feature_taps(model)
    bn = taps.bn_layers()
    with torch.no_grad():
        _, pooled = taps(x, list(bn), channels_first=bn)
    return sf.bn_score(pooled, bn)


def by_hand_u(a: np.ndarray) -> np.ndarray:
    """u = (a - beta) / gamma from the BN layer's output a = gamma (x - mean) / sqrt(var) + beta."""
    return (a - np.array(BETA)[None, :, None, None]) / np.array(GAMMA)[None, :, None, None]


def test_bn_score_is_minus_sum_of_squared_channel_means_of_u():
    # channel 0: (x - 3) / 2 = [[0, 1], [-1, 2]], mean 0.5; channel 1: (x + 2) / 0.5 = [[0, 1], [-1, 0]], mean 0
    x = t64([[[[3.0, 5.0], [1.0, 7.0]], [[-2.0, -1.5], [-2.5, -2.0]]]])
    assert bn_score(bn_model(), x).item() == pytest.approx(-0.25, rel=1e-12)
    # a second input, through the u = (a - beta) / gamma of the layer's output computed by hand
    x2 = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    xs = x2.numpy()
    mean, std = np.array(RUN_MEAN)[None, :, None, None], np.sqrt(RUN_VAR)[None, :, None, None]
    a = np.array(GAMMA)[None, :, None, None] * (xs - mean) / std + np.array(BETA)[None, :, None, None]
    expected = -(by_hand_u(a).mean(axis=(2, 3)) ** 2).sum(1)
    np.testing.assert_allclose(bn_score(bn_model(), x2), expected, rtol=1e-10)


def test_bn_score_near_zero_on_running_statistics_and_lower_when_shifted():
    z = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = z - z.mean(dim=(2, 3), keepdim=True)  # exactly zero-mean per channel
    mean, std = t64(RUN_MEAN).view(1, 2, 1, 1), t64(RUN_VAR).sqrt().view(1, 2, 1, 1)
    matching = mean + std * z
    shifted = matching + std  # one running std up in both channels: -(1^2 + 1^2)
    assert bn_score(bn_model(), matching).item() == pytest.approx(0.0, abs=1e-20)
    assert bn_score(bn_model(), shifted).item() == pytest.approx(-2.0, rel=1e-12)


def test_bn_score_sums_over_layers():
    second = set_bn(nn.BatchNorm2d(2).double(), (1.0, 1.0), (0.0, 0.0), (0.0, 0.0), (1.0, 1.0))
    model = nn.Sequential(bn_model()[0], second)  # the second layer standardises the first's output a
    x = t64([[[[3.0, 5.0], [1.0, 7.0]], [[-2.0, -1.5], [-2.5, -2.0]]]])
    # first layer: -0.25 (above); its output a = gamma u + beta has channel means 2 * 0.5 + 1 = 2 and -1
    assert bn_score(model, x).item() == pytest.approx(-0.25 - (2.0 ** 2 + 1.0 ** 2), rel=1e-12)


def test_bn_score_of_batchnorm1d_features():
    bn = set_bn(nn.BatchNorm1d(2).double(), GAMMA, BETA, RUN_MEAN, RUN_VAR)
    x = t64([[5.0, -2.5], [3.0, -2.0]])  # u = (1, -1) and (0, 0)
    np.testing.assert_allclose(bn_score(nn.Sequential(bn), x), [-2.0, 0.0], rtol=1e-12)


def test_bn_taps_leave_no_hook_behind():
    model = bn_model()
    x = t64([[[[3.0, 5.0], [1.0, 7.0]], [[-2.0, -1.5], [-2.5, -2.0]]]])
    assert bn_score(model, x).item() == pytest.approx(-0.25, rel=1e-12)
    assert not model[0]._forward_hooks


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_bn_score_without_batchnorm_is_none_and_torchscript_has_its_layers():
    assert bn_score(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), torch.randn(2, 1, 2, 2)) is None
    no_stats = nn.Sequential(nn.BatchNorm2d(2, affine=False)).eval()  # no gamma / beta to read
    assert bn_score(no_stats, torch.randn(2, 2, 3, 3)) is None
    # a TorchScript module's BatchNorm layers are reached through its graph: the same score
    x = t64([[[[3.0, 5.0], [1.0, 7.0]], [[-2.0, -1.5], [-2.5, -2.0]]]])
    assert bn_score(torch.jit.script(bn_model()), x).item() == pytest.approx(-0.25, rel=1e-12)


# ---------------------------------------------------------------- logits and penultimate features

def penultimate(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits, pooled = feature_taps(model)(x, [PENULTIMATE])
    return logits, pooled[PENULTIMATE]


def test_penultimate_features_of_a_model_with_embed():
    torch.manual_seed(0)
    model = tiny_student(num_classes=7).eval()
    x = torch.randn(3, 3, 32, 32)
    logits, feats = penultimate(model, x)
    with torch.no_grad():
        torch.testing.assert_close(feats, model.embed(x))
        torch.testing.assert_close(logits, model(x))
    assert feats.shape == (3, 32) and logits.shape == (3, 7)


def test_penultimate_features_are_the_input_of_the_last_linear():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=5).eval()
    assert not hasattr(model, "embed")
    x = torch.randn(2, 3, 32, 32)
    logits, feats = penultimate(model, x)
    with torch.no_grad():
        # classifier = Linear(576, 1024), Hardswish, Dropout, Linear(1024, 5): the last Linear's input
        pooled = torch.flatten(model.avgpool(model.features(x)), 1)
        expected = model.classifier[1](model.classifier[0](pooled))
        torch.testing.assert_close(feats, expected)
        torch.testing.assert_close(logits, model(x))
    assert feats.shape == (2, 1024)
    assert not model.classifier[3]._forward_hooks  # the hook is removed


def test_no_penultimate_features_without_a_linear_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    taps = feature_taps(model)
    assert taps.classifier is None and PENULTIMATE not in taps.default_layers()
    with pytest.raises(LayerNotFound, match="no Linear classifier"):
        taps.resolve([PENULTIMATE])


# ---------------------------------------------------------------- activation shaping: SCALE, ASH, ReAct
# The references below follow the papers' definitions in numpy, row by row: keep the k largest
# activations, k = d - round(d p / 100) (at least one), s1 = the sum of all, s2 = of the kept ones.

def np_energy(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


def np_kept(d: int, p: float) -> int:
    return max(1, d - int(np.round(d * p / 100.0)))


def np_shaped(f: np.ndarray, p: float, prune: bool) -> np.ndarray:
    out = np.zeros_like(f)
    for i, row in enumerate(f):
        top = np.argsort(-row, kind="stable")[: np_kept(len(row), p)]
        s1, s2 = row.sum(), row[top].sum()
        factor = 1.0 if s2 == 0 else math.exp(s1 / s2)
        kept = np.zeros_like(row)
        kept[top] = row[top]
        out[i] = (kept if prune else row) * factor
    return out


def np_scale(f, w, b, p):
    return np_energy(np_shaped(f, p, prune=False) @ w.T + b)


def np_ash(f, w, b, p):
    return np_energy(np_shaped(f, p, prune=True) @ w.T + b)


def np_react(f, w, b, c):
    return np_energy(np.minimum(f, c) @ w.T + b)


def shaping_case(seed: int, n: int = 6, d: int = 20, c: int = 4):
    """Non-negative (post-ReLU) features with distinct values, one all-zero row, a random head."""
    rng = np.random.default_rng(seed)
    f = rng.permutation(n * d).reshape(n, d).astype(np.float64) / (n * d) * rng.exponential(2.0, (n, 1))
    f[rng.random((n, d)) < 0.4] = 0.0  # sparse, like ReLU outputs
    f[0] = 0.0
    return f, rng.normal(size=(c, d)), rng.normal(size=c)


def shaped_scores(f, w, b, p: float) -> tuple[np.ndarray, np.ndarray]:
    ft, wt, bt = t64(f), t64(w), t64(b)
    return (sf.head_energy(sf.scale_features(ft, p), wt, bt).numpy(),
            sf.head_energy(sf.ash_s_features(ft, p), wt, bt).numpy())


def test_kept_count_is_openood_s_with_at_least_one():
    assert sf.kept_count(10, 85) == 2  # 10 - round(8.5): numpy rounds half to even, 8
    assert sf.kept_count(2048, 90) == 205 and sf.kept_count(2048, 85) == 307  # ResNet-50's penultimate layer
    assert sf.kept_count(7, 0) == 7 and sf.kept_count(7, 100) == 1 and sf.kept_count(4, 90) == 1
    for bad in (-1, 100.5):
        with pytest.raises(ValueError, match="percentile"):
            sf.kept_count(10, bad)


def test_scale_and_ash_by_hand():
    # f = (4, 3, 2, 1), p = 50: the top two survive, s1 = 10, s2 = 7, factor e^(10/7); W = I, b = 0
    f, w, b = np.array([[4.0, 3.0, 2.0, 1.0]]), np.eye(4), np.zeros(4)
    factor = math.exp(10 / 7)
    scale, ash = shaped_scores(f, w, b, 50)
    assert scale[0] == pytest.approx(math.log(sum(math.exp(v * factor) for v in (4, 3, 2, 1))), rel=1e-12)
    assert ash[0] == pytest.approx(math.log(math.exp(4 * factor) + math.exp(3 * factor) + 2), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("p", [0, 50, 85, 90, 100])
def test_scale_and_ash_match_the_papers_definitions(seed, p):
    f, w, b = shaping_case(seed)
    scale, ash = shaped_scores(f, w, b, p)
    np.testing.assert_allclose(scale, np_scale(f, w, b, p), rtol=1e-10)
    np.testing.assert_allclose(ash, np_ash(f, w, b, p), rtol=1e-10)
    # an all-zero vector has nothing to prune or sharpen: the logits are the bias alone
    assert scale[0] == pytest.approx(np_energy(b), rel=1e-12) and ash[0] == pytest.approx(np_energy(b), rel=1e-12)


def test_scale_and_ash_boundaries():
    f, w, b = shaping_case(3)
    scale0, ash0 = shaped_scores(f, w, b, 0)
    # p = 0 prunes nothing: both are the energy of e * f (s1 = s2)
    np.testing.assert_allclose(scale0, np_energy(math.e * f @ w.T + b), rtol=1e-10)
    np.testing.assert_allclose(ash0, scale0, rtol=1e-12)
    # p = 100 keeps the largest activation only
    _, ash100 = shaped_scores(f, w, b, 100)
    top = f.max(1, keepdims=True)
    only_max = np.where(f == top, f, 0.0) * np.exp(f.sum(1, keepdims=True) / np.where(top == 0, np.inf, top))
    np.testing.assert_allclose(ash100[1:], np_energy(only_max @ w.T + b)[1:], rtol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_react_clips_at_c(seed):
    f, w, b = shaping_case(seed)
    for c in (0.0, float(np.percentile(f, 90)), float(f.max()) + 1):
        got = sf.head_energy(sf.react_features(t64(f), c), t64(w), t64(b)).numpy()
        np.testing.assert_allclose(got, np_react(f, w, b, c), rtol=1e-10)
    # a clip above every activation changes nothing: the plain energy of the logits
    np.testing.assert_allclose(sf.head_energy(sf.react_features(t64(f), f.max() + 1), t64(w), t64(b)).numpy(),
                               np_energy(f @ w.T + b), rtol=1e-12)


def id_and_ood_features(seed: int = 0, d: int = 64, classes: int = 4, n: int = 12):
    """What the papers observe: an in-distribution sample spreads moderate activations over the units
    of its class; an OOD one puts abnormally large activations on a few units. Both have the same
    total, and the same plain energy up to noise."""
    rng = np.random.default_rng(seed)
    w = np.zeros((classes, d))
    for c in range(classes):
        w[c, c * 16:(c + 1) * 16] = 1.0
    ind = np.full((n, d), 0.05)
    ood = np.full((n, d), 0.05)
    for i in range(n):
        c = i % classes
        ind[i, c * 16:(c + 1) * 16] = 1.0
        ood[i, rng.integers(classes) * 16 + rng.choice(16, 2, replace=False)] = 8.0  # two units of one class
    noise = lambda: rng.uniform(0, 0.01, (n, d))  # noqa: E731 - distinct values
    return ind + noise(), ood + noise(), w, np.zeros(classes)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def test_shaping_scores_rank_id_above_ood_where_energy_cannot():
    ind, ood, w, b = id_and_ood_features()
    wt, bt = t64(w), t64(b)
    plain = [sf.head_energy(t64(x), wt, bt).numpy() for x in (ind, ood)]
    assert abs(plain[0].mean() - plain[1].mean()) < 1.0  # energy alone barely tells them apart
    clip = float(np.percentile(np.concatenate([ind, ood]), 90))  # ReAct's c from the pool
    for shape in (lambda x: sf.scale_features(x, 85), lambda x: sf.ash_s_features(x, 90),
                  lambda x: sf.react_features(x, clip)):
        id_score, ood_score = (sf.head_energy(shape(t64(x)), wt, bt).numpy() for x in (ind, ood))
        assert auroc(id_score, ood_score) == 1.0


def test_float16_histogram_percentile_is_numpy_s():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 3, 5000), np.zeros(700), np.full(50, 2.5), rng.exponential(1, 999)])
    x = x.astype(np.float16)
    halves = sf.float16_histogram(x[:3000]) + sf.float16_histogram(x[3000:])  # summed over shards
    np.testing.assert_array_equal(halves, sf.float16_histogram(x))
    for q in (0, 1, 10, 50, 85, 90, 99.9, 100):
        assert sf.histogram_percentile(halves, q) == pytest.approx(np.percentile(x.astype(np.float64), q), rel=1e-12)
    with_bad = np.concatenate([x, np.array([np.inf, -np.inf, np.nan], np.float16)])  # not activations: left out
    expected = np.percentile(x.astype(np.float64), 90)
    assert sf.histogram_percentile(sf.float16_histogram(with_bad), 90) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(sf.histogram_percentile(np.zeros(1 << 16, np.int64), 90))
    one = sf.float16_histogram(np.array([1.5], np.float16))
    assert sf.histogram_percentile(one, 0) == sf.histogram_percentile(one, 100) == 1.5


def test_rank_fusion_by_hand_with_ties_and_nulls():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([10.0, 10.0, np.nan, 0.0])  # ties average; a null is left out of its column's ranks
    # a: ranks 0, 1/3, 2/3, 1; b over (10, 10, 0): ranks 0.75, 0.75, -, 0
    np.testing.assert_allclose(sf.rank_fusion([a, b]), [(0 + 0.75) / 2, (1 / 3 + 0.75) / 2, 2 / 3, 0.5])
    assert np.isnan(sf.rank_fusion([np.array([np.nan, 1.0]), np.array([np.nan, 2.0])])[0])
    assert sf.rank_fusion([np.array([5.0])])[0] == 0.5


def test_rank_fusion_is_in_unit_range_and_monotone_in_each_column():
    rng = np.random.default_rng(0)
    cols = [rng.normal(size=50), rng.exponential(size=50), rng.integers(0, 5, 50).astype(float)]
    fused = sf.rank_fusion(cols)
    assert ((fused >= 0) & (fused <= 1)).all()
    # an independent computation: average percentile ranks from scipy's definition
    from scipy.stats import rankdata
    np.testing.assert_allclose(fused, np.mean([(rankdata(c) - 1) / 49 for c in cols], 0), rtol=1e-12)
    for col in range(3):  # raising one sample's value in one column, the others fixed, never lowers it
        previous = -1.0
        for v in np.linspace(-5, 10, 31):
            moved = [c.copy() for c in cols]
            moved[col][7] = v
            now = sf.rank_fusion(moved)[7]
            assert now >= previous - 1e-12
            previous = now
        assert previous > sf.rank_fusion([c if i != col else np.where(np.arange(50) == 7, -5, c)
                                          for i, c in enumerate(cols)])[7]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_linear_head_is_the_layer_the_features_feed():
    model = tiny_student(num_classes=7).eval()
    w, b = feature_taps(model).linear_head()
    assert torch.equal(w, model.classifier.weight) and torch.equal(b, model.classifier.bias)
    mobilenet = torchvision.models.mobilenet_v3_small(weights=None, num_classes=5).eval()
    w, _ = feature_taps(mobilenet).linear_head()
    assert torch.equal(w, mobilenet.classifier[3].weight)
    no_bias = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False))
    w, b = feature_taps(no_bias).linear_head()
    assert torch.equal(b, torch.zeros(3))
    assert feature_taps(nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())).linear_head() is None
    w, b = feature_taps(torch.jit.script(no_bias)).linear_head()  # TorchScript: the submodule's weight
    assert torch.equal(w, no_bias[1].weight) and torch.equal(b, torch.zeros(3))


# ---------------------------------------------------------------- Mahalanobis

# Two classes in 2-D, the same four offsets around each mean, so the tied (within-class) covariance
# is by hand sum(o o^T) / 4 = [[4, 2], [2, 2]] / 4, and the background covariance adds the
# between-class spread: the means (0, 0) and (4, 0) sit 2 away from the grand mean (2, 0) along x.
OFFSETS = np.array([[1.0, 1.0], [-1.0, -1.0], [1.0, 0.0], [-1.0, 0.0]])
MEANS = np.array([[0.0, 0.0], [4.0, 0.0]])
TIED_COV = np.array([[1.0, 0.5], [0.5, 0.5]])
BACKGROUND_MEAN = np.array([2.0, 0.0])
BACKGROUND_COV = np.array([[5.0, 0.5], [0.5, 0.5]])
REF_FEATURES = np.concatenate([MEANS[0] + OFFSETS, MEANS[1] + OFFSETS])
REF_LABELS = np.array([0] * 4 + [1] * 4)
QUERIES = np.array([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0], [10.0, 5.0]])


def squared_md(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> float:
    return mahalanobis(x, mean, np.linalg.inv(cov)) ** 2


def test_class_gaussians_by_hand():
    means, precision, mean0, precision0 = sf.class_gaussians(REF_FEATURES, REF_LABELS, 2, ridge=0.0)
    np.testing.assert_allclose(means, MEANS, atol=1e-12)
    np.testing.assert_allclose(precision, np.linalg.inv(TIED_COV), rtol=1e-9)
    np.testing.assert_allclose(mean0, BACKGROUND_MEAN, atol=1e-12)
    np.testing.assert_allclose(precision0, np.linalg.inv(BACKGROUND_COV), rtol=1e-9)


def test_mahalanobis_and_relative_mahalanobis_against_scipy():
    gauss = sf.class_gaussians(REF_FEATURES, REF_LABELS, 2, ridge=0.0)
    maha, rel = sf.mahalanobis_scores(QUERIES, *gauss)
    md = np.array([[squared_md(q, m, TIED_COV) for m in MEANS] for q in QUERIES])
    md0 = np.array([squared_md(q, BACKGROUND_MEAN, BACKGROUND_COV) for q in QUERIES])
    np.testing.assert_allclose(maha, -md.min(1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rel, -(md.min(1) - md0), rtol=1e-9, atol=1e-12)
    assert maha[0] == pytest.approx(0.0, abs=1e-12)  # a class mean
    assert maha[3] < maha[1:3].min()  # the far point scores lowest


def test_mahalanobis_default_ridge_stays_close():
    maha, _ = sf.mahalanobis_scores(QUERIES, *sf.class_gaussians(REF_FEATURES, REF_LABELS, 2))
    md = np.array([[squared_md(q, m, TIED_COV) for m in MEANS] for q in QUERIES])
    np.testing.assert_allclose(maha, -md.min(1), rtol=1e-4, atol=1e-9)


def test_classes_without_samples_are_skipped():
    means, *rest = sf.class_gaussians(REF_FEATURES, REF_LABELS, 4, ridge=0.0)  # classes 2 and 3 are empty
    assert np.isnan(means[2:]).all() and np.isfinite(means[:2]).all()
    maha, rel = sf.mahalanobis_scores(QUERIES, means, *rest)
    md = np.array([[squared_md(q, m, TIED_COV) for m in MEANS] for q in QUERIES])
    md0 = np.array([squared_md(q, BACKGROUND_MEAN, BACKGROUND_COV) for q in QUERIES])
    np.testing.assert_allclose(maha, -md.min(1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rel, -(md.min(1) - md0), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- the score stage's batch scorer

PER_SAMPLE = ["teacher_label", "teacher_conf", "msp", "max_logit", "energy", "neg_entropy", "gen", "bn_score",
              "scale", "ash", "odin", "kd3_label", "kd3_conf"]
WITH_STUDENT = ["student_label", "student_conf", "agreement", "neg_kl", "neg_js"]


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "tiny.pt"
    torch.save(tiny_student().state_dict(), path)
    return f"distill.models:tiny_student@{path}"


def uint8_batch(n: int, size: int = 224) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_batch_scorer_teacher_columns(tiny_spec):
    torch.set_num_threads(1)
    x = uint8_batch(3)
    out = BatchScorer(ScoreConfig(teacher=tiny_spec))(x)
    # the default feature layers: the penultimate features (in "features") and the last two stages
    assert set(PER_SAMPLE) | {"teacher_logits", "features", "layer_1", "layer_2"} == set(out)
    assert all(out[k].shape == (3,) for k in PER_SAMPLE)
    assert out["teacher_logits"].shape == (3, 10) and out["teacher_logits"].dtype == np.float16
    assert out["features"].shape == (3, 32)
    # the teacher run independently on the ImageNet-normalised input
    model = tiny_student()
    model.load_state_dict(torch.load(tiny_spec.split("@", 1)[1], weights_only=True))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        p = model.eval()((x.float() / 255 - mean) / std).softmax(-1).numpy()
    np.testing.assert_allclose(out["msp"], p.max(1), rtol=1e-5)
    np.testing.assert_array_equal(out["teacher_conf"], out["msp"])
    np.testing.assert_array_equal(out["teacher_label"], p.argmax(1))
    # no student: the combined prediction is the teacher's
    np.testing.assert_array_equal(out["kd3_label"], out["teacher_label"])
    np.testing.assert_allclose(out["kd3_conf"], out["teacher_conf"], rtol=1e-6)
    assert np.isfinite(out["bn_score"]).all() and (out["bn_score"] <= 0).all()
    assert np.isfinite(out["odin"]).all()
    # SCALE and ASH from the model's own penultimate features and classifier, by the numpy definitions
    with torch.no_grad():
        f = model.embed((x.float() / 255 - mean) / std).double().numpy()
    w, b = model.classifier.weight.double().detach().numpy(), model.classifier.bias.double().detach().numpy()
    np.testing.assert_allclose(out["scale"], np_scale(f, w, b, 85), rtol=1e-4)
    np.testing.assert_allclose(out["ash"], np_ash(f, w, b, 90), rtol=1e-4)


def test_batch_scorer_student_that_is_the_teacher_agrees(tiny_spec):
    torch.set_num_threads(1)
    out = BatchScorer(ScoreConfig(teacher=tiny_spec, student=tiny_spec, odin=False))(uint8_batch(3))
    assert set(WITH_STUDENT) <= set(out)
    assert all(out[k].shape == (3,) for k in WITH_STUDENT)
    np.testing.assert_array_equal(out["agreement"], 1.0)
    np.testing.assert_allclose(out["neg_kl"], 0.0, atol=1e-6)
    np.testing.assert_allclose(out["neg_js"], 0.0, atol=1e-6)
    np.testing.assert_allclose(out["student_conf"], out["teacher_conf"], rtol=1e-6)
    assert np.isnan(out["odin"]).all()  # switched off


@pytest.mark.parametrize("factory, note", [("no_linear", score.NO_FEATURES), ("doubled_logits", score.NOT_AFFINE)])
def test_batch_scorer_shaping_scores_are_nan_and_say_why(factory, note):
    torch.set_num_threads(1)
    scorer = BatchScorer(ScoreConfig(teacher=f"tests.models_for_tests:{factory}", odin=False, trust_model_code=True))
    out = scorer(uint8_batch(2, 32))
    assert np.isnan(out["scale"]).all() and np.isnan(out["ash"]).all()
    assert np.isfinite(out["energy"]).all()
    assert scorer.feature_note == note
