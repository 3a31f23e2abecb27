"""The logistic-regression head: the L-BFGS fit, folds, cross-validation of C and views, the
fitted head on raw features."""
import numpy as np
import pytest
import torch

from imgclf.heads import linear_probe as lp
from imgclf.heads import logistic


def blobs(photos=300, d=16, k=4, views=1, seed=0, spread=1.0):
    """Features (photos, views, d) of k classes, of very different scales and offsets per
    feature, as a backbone's are; views are noisy copies of each photo's."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    y = np.arange(photos) % k
    x = centers[y][:, None] + spread * rng.normal(size=(photos, views, d))
    x = x * rng.uniform(0.1, 5, size=d) + rng.normal(size=d)
    return torch.tensor(x, dtype=torch.float32), y


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_fit_matches_scikit_learn(c):
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = blobs()
    rows = lp.Standardizer(x[:, 0])(x[:, 0])
    weight, bias = lp.fit_logistic(rows, torch.as_tensor(y), 4, c)
    ref = sklearn.LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(rows.numpy(), y)
    # The same convex optimum, up to our looser stopping tolerance (gradient entries < 1e-4).
    scale = np.abs(ref.coef_).max()
    assert np.abs(weight.numpy() - ref.coef_).max() < 0.01 * scale
    assert np.abs(bias.numpy() - ref.intercept_).max() < 0.01 * scale


def test_stronger_regularisation_gives_smaller_weights():
    x, y = blobs()
    rows, labels = lp.Standardizer(x[:, 0])(x[:, 0]), torch.as_tensor(y)
    small, _ = lp.fit_logistic(rows, labels, 4, 0.001)
    large, _ = lp.fit_logistic(rows, labels, 4, 10.0)
    assert small.norm() < 0.2 * large.norm()


def test_rows_of_weight_zero_take_no_part():
    x, y = blobs(photos=80)
    rows, labels = x[:, 0], torch.as_tensor(y)
    weights = (torch.arange(80) < 60).float()
    masked = lp.fit_logistic(rows, labels, 4, 0.3, weights)
    dropped = lp.fit_logistic(rows[:60], labels[:60], 4, 0.3)
    assert torch.allclose(masked[0], dropped[0], atol=1e-3)


def test_each_photo_weighs_one_whatever_its_views():
    x, y = blobs(photos=10, views=4)
    rows, labels, weights = lp.training_rows(x, torch.as_tensor(y), lp.augmented(2))
    assert rows.shape == (40, 16) and labels.tolist() == np.repeat(y, 4).tolist()
    assert torch.allclose(weights.sum(), torch.tensor(10.0))
    assert torch.equal(rows[4:8], x[1])  # photo 1's views, in order


def test_folds_are_stratified_and_seeded():
    y = np.repeat(np.arange(3), 10)
    folds = lp.photo_folds(y, 5, seed=0)
    for cls in range(3):
        assert np.bincount(folds[y == cls], minlength=5).tolist() == [2] * 5
    assert not np.array_equal(folds, lp.photo_folds(y, 5, seed=1))


def test_candidates_follow_the_stored_views():
    assert lp.candidates(1) == [lp.PLAIN]
    assert lp.candidates(2) == [lp.PLAIN, lp.MIRRORED]
    assert lp.candidates(8) == [lp.PLAIN, lp.MIRRORED, lp.augmented(6)]
    assert lp.candidates(8, always_augment=True) == [lp.augmented(6)]


def test_cross_validation_prefers_strong_regularisation_on_noise():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(200, 1, 64)), dtype=torch.float32)
    y = np.arange(200) % 2  # labels unrelated to the features
    scores = lp.cross_validate(x, y, 2, [lp.PLAIN])
    view_set, c = min(scores, key=lambda key: scores[key][0])
    assert c == min(lp.C_GRID)


def test_cross_validation_prefers_weak_regularisation_on_clean_data():
    x, y = blobs(spread=0.3)
    scores = lp.cross_validate(x, y, 4, [lp.PLAIN])
    assert min(scores, key=lambda key: scores[key][0])[1] >= 1.0


def test_cross_validation_chooses_the_views_that_predict_better():
    """Mirrored views that are noise (a mirrored digit is another digit) lose to the plain
    views; mirrored views like the plain ones (a mirrored flower is a flower) win."""
    x, y = blobs(photos=200, views=2, spread=0.8)
    rng = np.random.default_rng(1)
    noise = x.clone()
    noise[:, 1] = torch.tensor(rng.normal(size=(200, 16)) * 5, dtype=torch.float32)
    head, _ = lp.choose_and_fit(noise, y, 4, [lp.PLAIN, lp.MIRRORED])
    assert head.view_set == lp.PLAIN
    head, _ = lp.choose_and_fit(x, y, 4, [lp.PLAIN, lp.MIRRORED])
    assert head.view_set == lp.MIRRORED


def test_head_on_raw_features_equals_the_standardised_fit():
    x, y = blobs()
    scaler = lp.Standardizer(x[:, 0])
    weight, bias = lp.fit_logistic(scaler(x[:, 0]), torch.as_tensor(y), 4, 0.3)
    head = lp.fit_head(x, y, 4, lp.PLAIN, 0.3)
    assert torch.allclose(head.logits(x), scaler(x[:, 0]) @ weight.T + bias, atol=1e-3)
    accuracy = (head.logits(x).argmax(1).numpy() == y).mean()
    assert accuracy > 0.9


def test_the_choice_is_printed_with_its_reasons():
    x, y = blobs(photos=100, views=2)
    head, scores = lp.choose_and_fit(x, y, 4, [lp.PLAIN, lp.MIRRORED])
    line = lp.choice_line(head, scores)
    assert line.startswith(f"head: logistic regression on {head.view_set.name}, C=")
    assert "over 5 folds of train+valid; best of" in line


def test_class_weights_count_like_repeated_photos():
    """--balance: a class of weight 2 fits as if each of its photos were there twice."""
    x, y = blobs(photos=60, views=1)
    weight = torch.tensor([2.0, 1.0, 1.0, 1.0])
    weighted = lp.fit_head(x, y, 4, lp.PLAIN, 0.3, class_weight=weight)
    again = np.r_[np.arange(60), np.flatnonzero(y == 0)]
    repeated = lp.fit_head(x[again], y[again], 4, lp.PLAIN, 0.3)
    # The same rows' statistics differ (the repeated photos count twice in the mean and
    # scale), so compare what each predicts rather than the weights.
    assert (weighted.logits(x).argmax(1) == repeated.logits(x).argmax(1)).float().mean() > 0.95
    plain = lp.fit_head(x, y, 4, lp.PLAIN, 0.3)
    assert not torch.allclose(weighted.bias, plain.bias, atol=1e-3)


def test_the_line_ends_with_the_seconds_the_head_took():
    x, y = blobs(photos=40)
    head = lp.fit_head(x, y, 4, lp.PLAIN, 0.3)
    head.cv_loss, head.cv_acc = 0.5, 0.9
    assert lp.choice_line(head, {(lp.PLAIN, 0.3): (0.5, 0.9)}, 12.34).endswith(") 12.3s")


def brute_force_choice(x, y, valid, grid):
    """C of the lowest valid loss, each fit from scratch on the train photos alone."""
    train, labels = x[:-valid], torch.as_tensor(y)
    losses = {}
    for c in grid:
        head = lp.fit_head(train, y[:-valid], 4, lp.PLAIN, c)
        losses[c] = lp.held_out_score(head, x, labels, np.arange(len(y) - valid, len(y)))[0]
    return min(losses, key=losses.get)


def test_the_warm_started_path_on_valid_chooses_as_brute_force(monkeypatch):
    monkeypatch.setattr(lp, "HOLDOUT_MIN_PHOTOS", 50)
    x, y = blobs(photos=240, spread=2.0, seed=3)
    head, scores = lp.choose_and_fit(x, y, 4, [lp.PLAIN], valid=60)
    assert head.held_out == "the valid split's 60 photos"
    assert head.c == brute_force_choice(x, y, 60, lp.C_GRID)
    assert len(scores) < len(lp.C_GRID)  # the path stopped once the valid loss rose
    again, _ = lp.choose_and_fit(x, y, 4, [lp.PLAIN], valid=60)
    assert torch.equal(again.weight, head.weight)  # --seed repeats a run exactly


def test_small_valid_splits_keep_cross_validation():
    few = np.arange(3 * lp.HOLDOUT_MIN_PHOTOS) % 3
    assert lp.holdout(few, valid=lp.HOLDOUT_MIN_PHOTOS - 1, seed=0) is None
    held = lp.holdout(few, valid=lp.HOLDOUT_MIN_PHOTOS, seed=0)
    assert held.fit == 2 * lp.HOLDOUT_MIN_PHOTOS and held.photos[0] == held.fit
    many = np.arange(5 * lp.HOLDOUT_MIN_PHOTOS) % 3  # a fit on train alone: a stratified fifth
    held = lp.holdout(many, valid=0, seed=0)
    assert held.name == f"a held-out fifth's {lp.HOLDOUT_MIN_PHOTOS} photos"
    assert held.mask.sum() == 4 * lp.HOLDOUT_MIN_PHOTOS and not held.mask[held.photos].any()


def test_float16_rows_in_chunks_fit_as_float32_rows_whole(monkeypatch):
    """The streamed fit (float16 rows as stored, the scaling folded in, chunks of rows) reaches
    the optimum of the plain one on the same values."""
    x, y = blobs(photos=200, views=2)
    x16 = x.half()
    whole = lp.fit_head(x16.float(), y, 4, lp.MIRRORED, 0.3)
    monkeypatch.setattr(logistic, "CHUNK_VALUES", 64 * 16)  # chunks of 256 rows: 2 per pass
    assert lp.chunk_rows(4, 16) < 400
    chunked = lp.fit_head(x16, y, 4, lp.MIRRORED, 0.3, streamed=True)
    assert chunked.weight.dtype == torch.float32
    ref = whole.logits(x16)
    assert (chunked.logits(x16) - ref).abs().max() < 0.02 * ref.abs().max()
    moments = lp.Standardizer(x16[:, 0], chunk=64)
    exact = lp.Standardizer(x16[:, 0].float())
    assert torch.allclose(moments.mean, exact.mean, atol=1e-5)
    assert torch.allclose(moments.scale, exact.scale, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_the_fits_run_on_the_device_given(monkeypatch, device):
    monkeypatch.setattr(lp, "HOLDOUT_MIN_PHOTOS", 50)
    x, y = blobs(photos=240, views=2)
    seen = []
    fit = lp.fit_logistic
    monkeypatch.setattr(lp, "fit_logistic", lambda *a, **k: seen.append(k["device"]) or
                        fit(*a, **k))
    head, _ = lp.choose_and_fit(x.half(), y, 4, [lp.PLAIN, lp.MIRRORED], valid=60,
                                device=device)
    assert seen and all(torch.device(d).type == device for d in seen)
    assert head.weight.device.type == "cpu"  # the head goes into the model on the CPU
    assert (head.logits(x).argmax(1).numpy() == y).mean() > 0.9


def fallback_trainer(photos, classes=3):
    import argparse

    from imgclf.engine import distributed, feature_trainer, train_config
    from imgclf.models import classifier
    config = train_config.TrainConfig()
    scan = argparse.Namespace(classes=list("abc")[:classes],
                              samples={"train": [None] * photos, "valid": [None] * 10})
    model = argparse.Namespace(head=classifier.build_head(1280, [0], classes, 0.2))
    trainer = feature_trainer.FeatureTrainer(config, scan, model, None,
                                      distributed.Single(torch.device("cpu")))
    trainer.fit_by_epochs = lambda: "the epoch head"
    trainer.fit_logistic = lambda: "the logistic head"
    return trainer


def test_past_the_memory_bound_the_epoch_head_trains_instead(monkeypatch, capsys):
    monkeypatch.setattr(lp, "available_memory", lambda: 1 << 30)
    trainer = fallback_trainer(photos=100_000)  # 100,000 x 2 views x 1,280 float16: 0.5 GB
    assert trainer.fit() == "the epoch head"
    assert (trainer.config.head, trainer.config.aug_views) == ("adamw", 1)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("head: the logistic head needs about 1.5 GiB "
                                               "for its 100010 photos' features, 1.0 GiB")
    assert out[0].endswith("training the epoch head (--head adamw) instead, which reads them "
                           "from disk")
    small = fallback_trainer(photos=1000)
    assert small.fit() == "the logistic head" and small.config.head == "logistic"


def test_the_progress_bar_shows_only_when_the_fits_take_a_while(monkeypatch, capsys):
    from imgclf.engine import feature_trainer
    quick = feature_trainer.LateProgress("fitting the head", after=60)
    quick.update(5)
    quick.close()
    slow = feature_trainer.LateProgress("fitting the head", after=0)
    for _ in range(3):
        slow.update(5)  # a path that stopped early: 3 fits of the 5 planned
    slow.close()
    err = capsys.readouterr().err
    assert err.count("fitting the head") == 1 and "3/3" in err


def test_the_cut_short_cross_validation_scores_and_chooses_as_fitting_every_c(monkeypatch):
    """Each view set's path stops once its held-out loss has risen twice: the C it leaves out
    could not win, and the C it fits score as when every C is fitted (the search's looser
    fits, warm-started from other fits, within their tolerance; the best, fitted exactly,
    closer)."""
    x, y = blobs(photos=100, d=64, views=2, spread=6.0, seed=4)  # noisy: C=0.1 wins
    view_sets = [lp.PLAIN, lp.MIRRORED]
    scores = lp.cross_validate(x, y, 4, view_sets)
    monkeypatch.setattr(lp, "PATH_PATIENCE", len(lp.C_GRID))
    every = lp.cross_validate(x, y, 4, view_sets)
    assert len(every) == 2 * len(lp.C_GRID) and len(scores) < len(every)
    for key, (loss, accuracy) in scores.items():
        assert loss == pytest.approx(every[key][0], rel=0.03)
    chosen = min(scores, key=lambda key: scores[key][0])
    assert chosen == min(every, key=lambda k: every[k][0])
    assert scores[chosen][0] == pytest.approx(every[chosen][0], rel=2e-3)


def exact_cv_loss(x, y, num_classes, view_set, c, seed=0):
    """The held-out loss of (view set, C) as cross-validation scored it before the search:
    each fold fitted cold to TOLERANCE."""
    labels = torch.as_tensor(y)
    folds = torch.from_numpy(lp.photo_folds(y, lp.FOLDS, seed))
    path = lp.fold_path(x, labels, view_set, folds, None)
    logits = torch.zeros(len(y), num_classes)
    rows, row_labels, row_weights, row_folds = path.rows
    for fold in range(lp.FOLDS):
        fit = lp.fit_logistic(rows, row_labels, num_classes, c, row_weights * (row_folds != fold))
        held = folds == fold
        logits[held] = lp.Head(*fit, view_set, c).logits(path.photos[held])
    return torch.nn.functional.cross_entropy(logits, labels).item(), logits


def test_the_choice_is_scored_by_exact_fits_after_a_looser_search():
    """The search's fits stop at SEARCH_TOLERANCE, looser than TOLERANCE; the (view set, C)
    near the best are fitted again to TOLERANCE, so the chosen one's score and held-out
    logits are those of cold exact fits, within the tolerance."""
    assert lp.SEARCH_TOLERANCE > lp.TOLERANCE
    x, y = blobs(photos=150, views=2, spread=1.5, seed=4)
    head, scores = lp.choose_and_fit(x, y, 4, [lp.PLAIN, lp.MIRRORED])
    loss, logits = exact_cv_loss(x, y, 4, head.view_set, head.c)
    assert head.cv_loss == pytest.approx(loss, rel=2e-3)
    probs = torch.from_numpy(head.held_out_logits).softmax(1)
    assert (probs - logits.softmax(1)).abs().max() < 0.03
    # every (view set, C) near the best was refitted: its score too is an exact fit's
    best = min(s for s, _ in scores.values())
    for (view_set, c), (score, _) in scores.items():
        if score <= best * (1 + lp.REFINE_MARGIN):
            assert score == pytest.approx(exact_cv_loss(x, y, 4, view_set, c)[0], rel=2e-3)


def test_the_final_fit_is_the_one_fitting_every_c_gave():
    """The choice is the same, and so is the final fit: cold, on all photos, bit for bit."""
    x, y = blobs(photos=150, views=2, spread=1.5, seed=4)
    head, _ = lp.choose_and_fit(x, y, 4, [lp.PLAIN, lp.MIRRORED])
    assert torch.equal(head.weight, lp.fit_head(x, y, 4, head.view_set, head.c).weight)


def test_the_head_keeps_the_held_out_logits_of_its_cross_validation():
    x, y = blobs(photos=150, views=2, spread=1.5, seed=4)
    head, _ = lp.choose_and_fit(x, y, 4, [lp.PLAIN, lp.MIRRORED])
    # what the search for label errors and the unknown verdict fitted before: k heads at the
    # chosen view set and C on the same folds, warm-started from the head
    refits = lp.out_of_fold_logits(x, y, 4, head)
    assert head.held_out_logits.shape == (150, 4)
    kept = torch.from_numpy(head.held_out_logits)
    # the same fold heads, reached from other starts: within L-BFGS's stopping tolerance
    assert (kept.softmax(1) - refits.softmax(1)).abs().max() < 0.03
    assert (kept.softmax(1) - refits.softmax(1)).abs().mean() < 1e-3
    assert (kept - refits).abs().mean() < 0.02 * refits.abs().mean()
    balanced, _ = lp.choose_and_fit(x, y, 4, [lp.PLAIN], class_weight=torch.ones(4))
    assert balanced.held_out_logits is None  # the search fits unweighted heads of its own


def test_held_out_logits_reuse_the_cross_validation_without_a_fit(monkeypatch):
    """The kept logits are those of the chosen (view set, C)'s fold fits, scored as the
    cross-validation scored them; held_out_logits() returns them and fits nothing."""
    x, y = blobs(photos=150, views=2, spread=1.5, seed=4)
    head, scores = lp.choose_and_fit(x, y, 4, [lp.PLAIN, lp.MIRRORED])
    kept = torch.from_numpy(head.held_out_logits)
    loss = torch.nn.functional.cross_entropy(kept, torch.as_tensor(y)).item()
    assert loss == pytest.approx(head.cv_loss, rel=1e-5)
    assert (kept.argmax(1).numpy() == y).mean() == pytest.approx(head.cv_acc)
    fits = []
    monkeypatch.setattr(lp, "fit_logistic", lambda *a, **k: fits.append(1))
    assert torch.equal(lp.held_out_logits(x, y, 4, head), kept) and not fits
    # other photos than the head's (or no kept logits): the k fold fits
    monkeypatch.undo()
    other = lp.held_out_logits(x[:100], y[:100], 4, head)
    assert other.shape == (100, 4)


def test_keeping_the_logits_leaves_the_choice_and_head_as_they_were():
    """The cross-validation scores, the choice and the final head are those of a run that
    keeps nothing: validate_paths' scores are the same numbers with or without the logits."""
    x, y = blobs(photos=150, views=2, spread=1.5, seed=4)
    head, scores = lp.choose_and_fit(x, y, 4, [lp.PLAIN, lp.MIRRORED])
    again = lp.cross_validate(x, y, 4, [lp.PLAIN, lp.MIRRORED])
    assert scores == again
    refit = lp.fit_head(x, y, 4, head.view_set, head.c)
    assert torch.equal(head.weight, refit.weight) and torch.equal(head.bias, refit.bias)


def test_the_fold_heads_are_less_confident_than_the_head_fitted_on_all_photos():
    """out_of_fold_fits' scale: the head's logits over the fold heads', on the same photos.
    With the same C and a fifth fewer photos the fold heads' weights are smaller: above 1."""
    x, y = blobs(photos=60, spread=1.5, seed=5)
    head = lp.fit_head(x, y, 4, lp.PLAIN, 0.1)
    logits, scale = lp.out_of_fold_fits(x, y, 4, head)
    assert torch.equal(logits, lp.out_of_fold_logits(x, y, 4, head))
    assert 1.02 < scale < 1.5


def test_the_kept_fits_give_out_of_fold_fits_scale_without_a_fit(monkeypatch):
    """held_out_fits: the kept logits, and the scale of out_of_fold_fits (the head's logit
    spread over the fold heads' mean) from the cross-validation's fold heads: no fit."""
    x, y = blobs(photos=150, views=2, spread=1.5, seed=4)
    head, _ = lp.choose_and_fit(x, y, 4, [lp.PLAIN, lp.MIRRORED])
    refits, refit_scale = lp.out_of_fold_fits(x, y, 4, head)
    fits = []
    monkeypatch.setattr(lp, "fit_logistic", lambda *a, **k: fits.append(1))
    logits, scale = lp.held_out_fits(x, y, 4, head)
    assert not fits and torch.equal(logits, torch.from_numpy(head.held_out_logits))
    assert scale == pytest.approx(refit_scale, rel=0.02) and scale > 1


def test_out_of_fold_fits_hold_the_fold_out_even_where_the_head_memorised(monkeypatch):
    """Labels with nothing to learn and a head that fits them all: each fold's fit must not
    start from that head (which has seen the fold, and whose gradient is then already under the
    tolerance), or its held-out logits are the head's own and no photo looks mislabelled. And
    the k fits are made once for the verdict and the search for label errors."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(100, 1, 256)), dtype=torch.float32)
    y = np.arange(100) % 4
    head = lp.fit_head(x, y, 4, lp.PLAIN, 100.0)
    assert (head.logits(x).argmax(1).numpy() == y).mean() > 0.95  # memorised
    logits, _ = lp.held_out_fits(x, y, 4, head)
    assert (logits.argmax(1).numpy() == y).mean() < 0.45  # 4 classes: chance is 0.25
    fits = []
    monkeypatch.setattr(lp, "fit_logistic", lambda *a, **k: fits.append(1))
    assert torch.equal(lp.held_out_logits(x, y, 4, head), logits) and not fits


def test_cross_validation_folds_never_start_from_a_fit_that_saw_them():
    """Random labels, one weak-L2 C: the held-out accuracy is chance's, not the memorising
    fit's (a fold started from the fold before's fit scored 86% here)."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(100, 1, 256)), dtype=torch.float32)
    y = np.arange(100) % 4
    scores, kept = lp.validate_paths(x, torch.as_tensor(y), 4, [lp.PLAIN], grid=(100.0,))
    assert scores[lp.PLAIN, 100.0][1] < 0.45
    assert (kept[lp.PLAIN][0].argmax(1).numpy() == y).mean() < 0.45


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_the_scipy_solver_reaches_scikit_learns_optimum(c):
    """fit_logistic(solver="scipy"), the held-out path's and the large search's fit: the same
    optimum as scikit-learn's, and the weights returned are those of the last accepted point
    (not a line search's last trial), streamed from float16 rows with the scaling folded in."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = blobs()
    scaler = lp.Standardizer.streamed(x[:, 0].half(), 4)
    weight, bias = lp.fit_logistic(x[:, 0].half(), torch.as_tensor(y), 4, c, scaler=scaler,
                                   solver="scipy", tolerance=1e-7)
    rows = scaler(x[:, 0].half().float()).numpy()
    ref = sklearn.LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(rows, y)
    scale = np.abs(ref.coef_).max()
    assert np.abs(weight.numpy() - ref.coef_).max() < 1e-3 * scale
    assert np.abs(bias.numpy() - ref.intercept_).max() < 1e-3 * scale


@pytest.mark.parametrize("exact", [True, False])
def test_chunked_moments_hold_large_offsets(exact):
    """The streamed scaler's moments, a chunk at a time around the first chunk's mean (each
    chunk in float32 where not exact), against float64 over all rows: features offset by
    1,000 with a spread of 1."""
    rng = np.random.default_rng(0)
    rows = torch.tensor(1000 + rng.normal(size=(5000, 8)) * rng.uniform(0.5, 2, 8),
                        dtype=torch.float16)
    mean, std = lp.chunked_moments(rows, 700, exact)
    exact = rows.double()
    assert torch.allclose(mean.double(), exact.mean(0), rtol=0, atol=1e-4)
    assert torch.allclose(std.double(), exact.std(0), rtol=1e-4)


def test_large_searches_hold_out_half_by_scipy_and_stay_held_out(monkeypatch):
    """From LARGE_SEARCH_PHOTOS photos the held-out logits come from 2 cold folds fitted by
    scipy's L-BFGS-B to SEARCH_TOLERANCE, still held out: random labels that the head
    memorised score chance."""
    monkeypatch.setattr(lp, "LARGE_SEARCH_PHOTOS", 100)
    assert lp.search_fits(99)["k"] == lp.FOLDS and lp.search_fits(99)["solver"] == "torch"
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(100, 1, 256)), dtype=torch.float32)
    y = np.arange(100) % 4
    head = lp.fit_head(x, y, 4, lp.PLAIN, 100.0)
    seen, fit = [], lp.fit_logistic
    monkeypatch.setattr(lp, "fit_logistic", lambda *a, **k: seen.append(k) or fit(*a, **k))
    logits, scale = lp.held_out_fits(x, y, 4, head)
    assert len(seen) == 2 and all(k["solver"] == "scipy" and "init" not in k
                                  and k["tolerance"] == lp.SEARCH_TOLERANCE for k in seen)
    assert (logits.argmax(1).numpy() == y).mean() < 0.45  # 4 classes: chance is 0.25
    assert scale > 1  # fold heads fitted on half the photos are less confident
