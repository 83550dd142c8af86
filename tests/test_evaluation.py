"""The test metrics against scikit-learn's: ROC AUC, average precision, recall, precision, f1."""

import math

import numpy as np
import pytest

from dlrm_s_pytorch import Evaluation, average_precision, roc_auc

metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_and_average_precision_equal_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    targets = (rng.random(2000) < 0.3).astype(np.float32)
    scores = np.clip(0.3 * targets + rng.random(2000), 0, 1).astype(np.float32)
    scores[::7] = np.round(scores[::7], 1)  # ties, which count half
    assert roc_auc(scores, targets) == pytest.approx(metrics.roc_auc_score(targets, scores), abs=1e-12)
    assert average_precision(scores, targets) == pytest.approx(
        metrics.average_precision_score(targets, scores), abs=1e-12
    )


def test_mlperf_metrics_equal_sklearn() -> None:
    rng = np.random.default_rng(7)
    targets = (rng.random(500) < 0.4).astype(np.float32)
    scores = np.clip(0.4 * targets + 0.8 * rng.random(500), 0, 1)
    computed = Evaluation(0.0, 0.0, roc_auc(scores, targets), scores, targets).mlperf_metrics()
    predicted = np.round(scores)
    assert computed["recall"] == pytest.approx(metrics.recall_score(targets, predicted))
    assert computed["precision"] == pytest.approx(metrics.precision_score(targets, predicted))
    assert computed["f1"] == pytest.approx(metrics.f1_score(targets, predicted))


def test_the_mlperf_loss_is_the_log_loss_of_every_score_whatever_the_loss_function() -> None:
    rng = np.random.default_rng(3)
    targets = (rng.random(400) < 0.3).astype(np.float32)
    scores = (0.05 + 0.9 * rng.random(400)).astype(np.float32)
    evaluation = Evaluation(0.123, 0.0, roc_auc(scores, targets), scores, targets)  # 0.123: an mse, say
    assert evaluation.mlperf_metrics()["loss"] == pytest.approx(
        metrics.log_loss(targets, scores), rel=1e-6
    )  # its sums in float32


def test_the_mlperf_loss_clips_scores_as_the_originals_scikit_learn() -> None:
    scores, targets = np.array([0.0, 1.0, 1.0], dtype=np.float32), np.array([0.0, 1.0, 0.0], dtype=np.float32)
    eps = 1e-15  # log_loss's default in scikit-learn 0.23, the original's
    clipped = np.array([eps, 1 - eps, 1 - eps])
    expected = -(np.log(1 - clipped[0]) + np.log(clipped[1]) + np.log(1 - clipped[2])) / 3  # finite, about 11.5
    assert Evaluation(0.0, 0.0, 0.5, scores, targets).mlperf_metrics()["loss"] == pytest.approx(expected)


def test_one_class_has_no_auc() -> None:
    assert math.isnan(roc_auc(np.array([0.2, 0.7]), np.array([1.0, 1.0])))
    assert roc_auc(np.array([0.2, 0.7]), np.array([0.0, 1.0])) == 1.0
