"""Book checkpoints: every shipped file loads and matches its checksum, recipes are deterministic, and a
missing or corrupt file gives an error that names it and the command that recreates it."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from vitdiff import bookmetrics, pretrained
from vitdiff.metrics import evaluator_data, get_evaluator

SHIPPED = sorted(set(pretrained.RECIPES) - pretrained.PLANNED - pretrained.METRICS_ONLY)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_loads_with_its_checksum(name):
    weights, sidecar = pretrained.paths(name)
    assert weights.is_file() and sidecar.is_file(), f"{name} is not shipped"
    assert weights.stat().st_size <= 4 * 2**20, f"{weights} is larger than 4 MB"
    meta = pretrained.info(name)
    assert meta["sha256"] == pretrained._sha256(weights)
    assert meta["steps"] == pretrained.recipe(name).train["steps"], "a shipped checkpoint ran its whole recipe"
    model = pretrained.load(name)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert meta["metrics"], f"{name} has no measurements in its sidecar; run `python -m vitdiff.pretrained evaluate`"


@pytest.mark.parametrize("name", sorted(pretrained.METRICS_ONLY))
def test_metrics_only_recipes_ship_a_measured_sidecar(name):
    meta = pretrained.info(name)
    assert meta["metrics"] and meta["steps"] == pretrained.recipe(name).train["steps"]
    assert len(meta["sha256"]) == 64, "the sidecar records the weights' checksum for a retrained copy"
    assert not pretrained.paths(name)[0].exists()
    with pytest.raises(pretrained.PretrainedError, match=f"python -m vitdiff.pretrained train {name}"):
        pretrained.load(name)


def test_shipped_checkpoints_fit_the_size_budget():
    total = sum(pretrained.paths(name)[0].stat().st_size for name in SHIPPED)
    assert total <= 32 * 10**6  # 32 MB in decimal units, the stricter reading (30.5 MiB)


def _two_step_run(tmp_path, tag):
    return pretrained.train_recipe("fmnist_vae", steps=2, directory=tmp_path / tag, run_dir=tmp_path / f"run-{tag}",
                                   device="cpu", progress=False)


def test_a_recipe_trained_twice_gives_identical_weights(tmp_path):
    first, second = _two_step_run(tmp_path, "a"), _two_step_run(tmp_path, "b")
    assert first["sha256"] == second["sha256"]
    assert first["steps"] == 2 and first["images_seen"] == 2 * pretrained.recipe("fmnist_vae").train["batch_size"]


def test_missing_and_corrupt_checkpoints_name_the_file_and_the_fix(tmp_path):
    _two_step_run(tmp_path, "c")
    folder = tmp_path / "c"
    weights, sidecar = pretrained.paths("fmnist_vae", folder)
    assert pretrained.load("fmnist_vae", directory=folder).training is False  # intact: it loads
    # a byte flipped in the weights: the checksum catches it
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(pretrained.PretrainedError, match=r"sha256.*python -m vitdiff.pretrained train fmnist_vae"):
        pretrained.load("fmnist_vae", directory=folder)
    weights.unlink()
    with pytest.raises(pretrained.PretrainedError, match=r"fmnist_vae.safetensors are missing.*train fmnist_vae"):
        pretrained.load("fmnist_vae", directory=folder)
    sidecar.write_text("{not json")
    with pytest.raises(pretrained.PretrainedError, match=r"corrupt.*train fmnist_vae"):
        pretrained.info("fmnist_vae", directory=folder)
    shutil.rmtree(folder)
    with pytest.raises(pretrained.PretrainedError, match=r"fmnist_vae.json is missing"):
        pretrained.load("fmnist_vae", directory=folder)
    with pytest.raises(ValueError, match=r"no book checkpoint recipe 'nope'"):
        pretrained.load("nope")


def test_a_checkpoint_from_another_recipe_is_refused(tmp_path):
    _two_step_run(tmp_path, "d")
    _, sidecar = pretrained.paths("fmnist_vae", tmp_path / "d")
    meta = json.loads(sidecar.read_text())
    meta["recipe"]["train"]["lr"] = 123.0
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(pretrained.PretrainedError, match="another recipe"):
        pretrained.load("fmnist_vae", directory=tmp_path / "d")


@pytest.mark.parametrize("name, threshold", [("mnist", 0.98), ("fashion_mnist", 0.88), ("shapes", 0.98),
                                             ("shapes_ring", 0.98)])
def test_the_evaluators_can_be_trusted(name, threshold):
    evaluator = get_evaluator(name)
    images, labels = evaluator_data(name, train=False, limit=2000)
    predictions = evaluator.predict_attributes(images)  # (N, heads)
    labels = labels.reshape(len(labels), -1)
    for head in range(labels.shape[1]):
        accuracy = (predictions[:, head] == labels[:, head]).float().mean().item()
        assert accuracy >= threshold, f"{name} evaluator head {head}: {accuracy:.3f} < {threshold}"


def test_candidates_keep_the_model_data_and_objective_of_their_recipe():
    assert pretrained.CANDIDATES and not set(pretrained.CANDIDATES) & set(pretrained.RECIPES)
    for name, candidate in pretrained.CANDIDATES.items():
        base = pretrained.RECIPES[max((n for n in pretrained.RECIPES if name.startswith(n + "_")), key=len)]
        assert pretrained.recipe(name) is candidate
        assert (candidate.model, candidate.data, candidate.objective) == (base.model, base.data, base.objective)
        # training: only the length, the batch, the learning rate, Adam's betas and the seed may change; options:
        # added, or a distillation weight or temperature or the loss weighting changed, never what names the data
        # (teacher, VAE, noise schedule)
        assert set(base.train) <= set(candidate.train) <= set(base.train) | {"betas"}
        assert {k for k in candidate.train if candidate.train[k] != base.train.get(k)} <= {
            "steps", "batch_size", "lr", "seed", "betas"}
        assert set(base.options) <= set(candidate.options)
        changed = {k for k in base.options if candidate.options[k] != base.options[k]}
        assert changed <= {"distill_weight", "distill_temperature", "min_snr_gamma"}, (name, changed)
        assert (candidate.config, candidate.train, candidate.options) != (base.config, base.train, base.options)
        pretrained.build_model(candidate)  # the config builds


def test_the_book_vit_learns_from_its_teacher():
    from vitdiff.data import dataset_tensors
    from vitdiff.vit import distillation_loss

    r = pretrained.recipe("fmnist_vit")
    teacher = pretrained.load(r.options["teacher"])
    assert pretrained.recipe(r.options["teacher"]).data == r.data  # the same images, labels and scale [0, 1]
    x, y = (t[:32] for t in dataset_tensors("fashion_mnist", train=False))
    with torch.no_grad():
        teacher_logits = teacher(x)
    torch.manual_seed(0)
    student = pretrained.build_model(r)
    loss = pretrained.recipe_loss(r, torch.device("cpu"))(student, (x, y, teacher_logits))
    expected = distillation_loss(student(x), teacher_logits, y, r.options["distill_temperature"],
                                 r.options["distill_weight"])
    torch.testing.assert_close(loss, expected)
    assert (teacher_logits.argmax(1) == y).float().mean() > 0.8  # a teacher worth learning from
    bad = pretrained.Recipe(**{**r.__dict__, "options": {**r.options, "max_shift": 2}})
    with pytest.raises(ValueError, match="unaugmented"):
        pretrained.recipe_loss(bad, torch.device("cpu"))


def test_a_distilled_recipe_gets_its_teachers_logits_for_every_image(monkeypatch):
    from vitdiff.data import dataset_tensors

    images, labels = (t[:2500] for t in dataset_tensors("fashion_mnist", train=False))  # not a multiple of 1,000
    monkeypatch.setattr(pretrained, "dataset_tensors", lambda name: (images, labels))
    r = pretrained.recipe("fmnist_vit")
    x, y, logits = pretrained.recipe_data(r, torch.device("cpu"))
    assert torch.equal(x, images) and torch.equal(y, labels) and logits.shape == (2500, 10)
    with torch.no_grad():
        torch.testing.assert_close(logits, pretrained.load(r.options["teacher"])(images))
    incomplete = pretrained.Recipe(**{**r.__dict__, "options": {"teacher": r.options["teacher"]}})
    with pytest.raises(ValueError, match="distill_temperature"):
        pretrained.recipe_loss(incomplete, torch.device("cpu"))


def test_the_min_snr_option_weights_a_recipes_diffusion_loss():
    from vitdiff.diffusion import NoiseSchedule, diffusion_loss

    weighted = pretrained.recipe("mnist_ddpm")  # the book model's recipe weights its loss (Min-SNR-5)
    base = pretrained._variant("mnist_ddpm", "mnist_ddpm_probe", "probe", 1, options={"min_snr_gamma": None})
    assert weighted.options["min_snr_gamma"] == 5.0
    torch.manual_seed(0)
    model, x0 = pretrained.build_model(base), torch.rand(4, 1, 28, 28) * 2 - 1
    schedule = NoiseSchedule(1000, base.options["schedule"])
    losses = {}
    perturbed = pretrained.recipe("mnist_ddpm_ip")  # a candidate: input perturbation 0.1 on top of Min-SNR-5
    for tag, r, gamma, ip in (("plain", base, None, None), ("weighted", weighted, 5.0, None),
                              ("perturbed", perturbed, 5.0, 0.1)):
        torch.manual_seed(1)  # the same t and noise for the recipe's loss and the direct call
        losses[tag] = pretrained.recipe_loss(r, torch.device("cpu"))(model, (x0,))
        torch.manual_seed(1)
        torch.testing.assert_close(losses[tag], diffusion_loss(model, schedule, x0, base.objective, snr_gamma=gamma,
                                                               input_perturbation=ip))
    assert not torch.isclose(losses["plain"], losses["weighted"])
    half = lambda x, t: 0.5 * x  # a denoiser that reads its input (the fresh U-Net's zero output does not)
    torch.manual_seed(2)
    perturbed_loss = pretrained.recipe_loss(perturbed, torch.device("cpu"))(half, (x0,))
    torch.manual_seed(2)
    assert not torch.isclose(perturbed_loss, pretrained.recipe_loss(weighted, torch.device("cpu"))(half, (x0,)))
    with pytest.raises(ValueError, match="input_perturbation"):  # not an option of the flow objective
        pretrained.recipe_loss(pretrained._variant("fmnist_unet_flow", "x", "", 1, options={"input_perturbation": 0.1}),
                               torch.device("cpu"))


def test_held_out_combinations_leave_every_attribute_value_in_training():
    from vitdiff.data import COLOR_NAMES, POSITION_NAMES, SHAPE_NAMES

    held = set(pretrained.HELD_OUT)
    assert len(held) == 7 and held <= set(pretrained.SHAPE_TRIPLES)
    seen = [t for t in pretrained.SHAPE_TRIPLES if t not in held]
    for k, names in enumerate((SHAPE_NAMES, COLOR_NAMES, POSITION_NAMES)):
        assert {t[k] for t in seen} == set(range(len(names))), "every value of every attribute is still trained"
    labels = torch.tensor(pretrained.SHAPE_TRIPLES).repeat(2, 1)  # (96, 3)
    mask = pretrained.is_held_out(labels)
    assert mask.sum() == 14
    assert {tuple(row) for row in labels[mask].tolist()} == held


def test_cpu_seconds_per_step_times_real_steps_on_one_thread():
    threads = torch.get_num_threads()
    seconds = pretrained.cpu_seconds_per_step("fmnist_vae", steps=1, warmup=1)
    assert seconds > 0 and torch.get_num_threads() == threads, "the caller's thread count is restored"


def test_chapter_09_contestants_match_the_mmdit_in_everything_but_the_backbone():
    """Same data, objective, options, text encoder, batch and optimiser; parameters within 4%; steps sized by time."""
    base = pretrained.recipe("shapes_mmdit")
    count = lambda r: sum(p.numel() for p in pretrained.build_model(r).parameters())
    for name in ("shapes_crossdit", "shapes_unet_latent"):
        r = pretrained.recipe(name)
        assert (r.data, r.objective, r.options) == (base.data, base.objective, base.options)
        assert r.config["encoder"] == base.config["encoder"]
        same = lambda train: {k: v for k, v in train.items() if k != "steps"}
        assert same(r.train) == same(base.train)
        assert abs(count(r) / count(base) - 1) < 0.04, name
        assert r.train["steps"] < base.train["steps"]  # both are slower per step than the MMDiT


def test_cross_attention_shares_reads_the_object_quadrant():
    from vitdiff.bookmetrics import CAPTION_WORDS, cross_attention_shares

    r = pretrained.recipe("shapes_unet_latent")
    model = pretrained.build_model(r).eval()
    stoi = pretrained.shapes_tokenizer().stoi
    sides = [int(m.shape[2] ** 0.5) for m in model.cross_attention_maps(
        torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.tensor([[stoi["a"]] * 8]), torch.ones(1, 8, dtype=torch.bool))]

    def fake_maps(x, t, ids, ids_mask):  # every word uniform, except the colour word: all in the named quadrant
        maps = []
        for side in sides:
            m = torch.full((len(ids), 2, side, side, ids.shape[1]), 1 / side**2)
            for b, row in enumerate(ids.tolist()):
                r0 = 0 if row[5] == stoi["top"] else side // 2
                c0 = 0 if row[6] == stoi["left"] else side // 2
                m[b, :, :, :, 1] = 0
                m[b, :, r0:r0 + side // 2, c0:c0 + side // 2, 1] = 1 / (side // 2) ** 2
            maps.append(m.reshape(len(ids), 2, side * side, -1))
        return maps

    model.cross_attention_maps = fake_maps
    result = cross_attention_shares(model)
    assert result["images"] == 48 and len(result["layers"]) == len(sides)
    assert [layer["side"] for layer in result["layers"]] == sides
    assert result["layers"][0]["layer"].startswith("down") and result["layers"][-1]["layer"].startswith("up")
    for layer in result["layers"]:
        assert layer["share"]["colour"] == pytest.approx(1.0)
        for word in CAPTION_WORDS:
            if word != "colour":
                assert layer["share"][word] == pytest.approx(0.25)
    shown = result["probe_maps"]
    assert len(shown["layers"]) == 2 and set(shown["maps"]) == set(shown["layers"])
    probe = torch.tensor(shown["maps"][shown["layers"][0]])  # (2, L, side, side); the first probe is top left
    assert probe[0, 1, :probe.shape[-1] // 2, :probe.shape[-1] // 2].sum().item() == pytest.approx(1.0, abs=1e-3)


def test_shapes_validation_loss_is_the_same_draw_for_every_model():
    from vitdiff.bookmetrics import shapes_validation_loss

    class Zero(torch.nn.Module):  # predicts velocity 0: the loss is then E||ε - z0||² = 1 + E[z0²] per element
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, ids, ids_mask):
            return torch.zeros_like(x) + 0 * self.anchor

    model = pretrained.load("shapes_mmdit")
    first, second = shapes_validation_loss(model, n=50), shapes_validation_loss(model, n=50)
    zero = shapes_validation_loss(Zero(), n=50)
    assert first == second, "fixed noise and timesteps: the same number every time"
    assert 1.5 < zero < 2.5 and first < 0.3 * zero, (first, zero)


def test_list_names_every_recipe_and_says_which_ship_as_sidecars(capsys):
    assert pretrained._main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(pretrained.RECIPES)
    for line in lines:
        name = line.split()[0]
        assert ("sidecar only" in line) == (name in pretrained.METRICS_ONLY), line
        assert "missing" not in line, line


def test_mnist_ddpm_table_has_the_kept_eps_rows_and_can_skip_the_1000_step_row():
    model = pretrained.load("mnist_ddpm")
    m = bookmetrics.measure("mnist_ddpm", model, torch.device("cpu"), progress=False, samples=32, samples_1000=0,
                            steps=(3,), diffusers_default_steps=(3,))
    rows = m["fd_table"]
    assert [(r["sampler"], r["steps"], r["samples"]) for r in rows] == [
        ("DDIM (eta=0)", 3, 32), ("DDPM, strided (eta=1)", 3, 32), ("DDIM, model's eps kept", 3, 32)]
    assert all(math.isfinite(r["fd"]) and r["floor"] > 0 for r in rows)
    # same noise, same model, so the two DDIM rows would be equal to the last digit if both used one sampler
    assert rows[0]["fd"] != rows[2]["fd"]


def test_the_min_snr_comparison_matches_the_shipped_table_and_survives_re_measuring(tmp_path, monkeypatch):
    from vitdiff import bookmetrics

    metrics = pretrained.info("mnist_ddpm")["metrics"]
    table = {(r["sampler"], r["steps"]): r["fd"] for r in metrics["fd_table"]}
    rows = metrics["min_snr_comparison"]["rows"]
    assert len(rows) == len(table) and all(table[(r["sampler"], r["steps"])] == r["fd_min_snr"] for r in rows)
    assert metrics["min_snr_comparison"]["floor"] == metrics["fd_table"][0]["floor"]
    assert metrics["min_snr_comparison"]["sha256"] == pretrained.info("mnist_ddpm")["sha256"]
    # evaluate_recipe re-measures the checkpoint's own table but keeps the record of the other training
    for path in pretrained.paths("mnist_ddpm"):
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.setattr(bookmetrics, "measure", lambda *args, **kwargs: {"fd_table": []})
    meta = pretrained.evaluate_recipe("mnist_ddpm", directory=tmp_path, device="cpu", progress=False)
    records = ("min_snr_comparison", "input_perturbation_comparison", "fd_1000_draws")
    assert meta["metrics"]["fd_table"] == []
    for key in records:
        assert meta["metrics"][key] == metrics[key]
        assert pretrained.info("mnist_ddpm", tmp_path)["metrics"][key] == metrics[key]
    # ... but not once the weights are others than the ones it compared
    sidecar = pretrained.paths("mnist_ddpm", tmp_path)[1]
    meta = json.loads(sidecar.read_text())
    for key in records:
        meta["metrics"][key]["sha256"] = "0" * 64
    sidecar.write_text(json.dumps(meta))
    monkeypatch.setattr(pretrained, "load", lambda *args, **kwargs: None)
    remeasured = pretrained.evaluate_recipe("mnist_ddpm", directory=tmp_path, progress=False)["metrics"]
    assert not set(records) & set(remeasured)


def test_the_input_perturbation_comparison_names_the_shipped_rows_and_its_candidates():
    metrics = pretrained.info("mnist_ddpm")["metrics"]
    record = metrics["input_perturbation_comparison"]
    assert record["sha256"] == pretrained.info("mnist_ddpm")["sha256"]
    assert record["floor"] == metrics["fd_table"][0]["floor"]
    # the rows without the perturbation are the book model's own table and the plain-loss training's
    table = {(r["sampler"], r["steps"]): r["fd"] for r in metrics["fd_table"]}
    plain = {(r["sampler"], r["steps"]): r["fd_plain_loss"] for r in metrics["min_snr_comparison"]["rows"]}
    for row in record["rows"]:
        source = table if row["loss"] == "Min-SNR-5" else plain
        assert row["fd_without"] == source[(row["sampler"], row["steps"])]
        assert math.isfinite(row["fd_with"]) and row["fd_with"] > record["floor"]
    # the draws of the 1000-step row start from the table's own draw (seed 0), one per seed, each its own
    draws = metrics["fd_1000_draws"]
    row = next(r for r in metrics["fd_table"] if r["steps"] == 1000)
    assert draws["seeds"] == [0, 1, 2, 3] and draws["fd"][0] == row["fd"] and draws["floor"] == row["floor"]
    assert draws["sha256"] == pretrained.info("mnist_ddpm")["sha256"] and len(set(draws["fd"])) == 4
    assert all(draws["floor"] < fd < 3 * draws["floor"] for fd in draws["fd"])
    # the perturbed trainings are reproducible candidates of the book recipe that differ only in that option
    for name, gamma in (("mnist_ddpm_ip", 5.0), ("mnist_ddpm_ip_plain", None)):
        candidate, book = pretrained.recipe(name), pretrained.recipe("mnist_ddpm")
        assert candidate.options == {**book.options, "min_snr_gamma": gamma, "input_perturbation": record["gamma"]}
        assert (candidate.config, candidate.train) == (book.config, book.train)


def test_the_vit_seed_comparison_names_the_shipped_runs():
    metrics = pretrained.info("fmnist_vit")["metrics"]
    record = metrics["seed_comparison"]
    assert record["sha256"] == pretrained.info("fmnist_vit")["sha256"]
    # seed 0 is what the two shipped sidecars measured; the other seeds are other trainings of the same recipes
    assert record["runs"]["0"] == {"fmnist_vit": metrics["test_accuracy"],
                                   "fmnist_vit_cls": pretrained.info("fmnist_vit_cls")["metrics"]["test_accuracy"]}
    assert pretrained.recipe("fmnist_vit").train["seed"] == 0 and 0 not in record["seeds"]
    assert set(record["runs"]) == {"0"} | {str(seed) for seed in record["seeds"]}
    for seed in record["seeds"]:
        other = record["runs"][str(seed)]
        assert set(other) == {"fmnist_vit", "fmnist_vit_cls"} and all(0.1 < v < 1 for v in other.values())
        assert other != record["runs"]["0"], "another seed gives another training"


def test_shapes_text_experts_hand_the_shipped_shift_model_over_to_the_plain_one_at_snr_1():
    from vitdiff.diffusion import matching_timesteps

    experts = pretrained.shapes_text_experts()
    high, low = pretrained.load("shapes_text"), pretrained.load("shapes_text_noshift")
    shifted = pretrained.recipe_schedule("shapes_text")
    table = matching_timesteps(pretrained.recipe_schedule("shapes_text_noshift"), shifted)
    abar = torch.tensor(shifted.alphas_cumprod_float64)
    switch = int((abar >= 0.5).nonzero().max())  # the noisiest timestep the plain model still takes
    assert experts.switch_abar == 0.5 and not experts.training
    ids, mask = pretrained.shapes_tokenizer().encode(["a red circle at the top left", "a blue square"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t, expert, t_expert in ((999, high, 999), (switch + 1, high, switch + 1), (switch, low, table[switch]),
                                    (0, low, table[0])):
            expected = expert(x, torch.full((2,), int(t_expert)), ids=ids, ids_mask=mask)
            assert torch.equal(experts(x, torch.full((2,), t), ids=ids, ids_mask=mask), expected), t


def test_the_two_shapes_experts_follow_every_attribute_of_their_prompts():
    from vitdiff import bookmetrics

    model = pretrained.load("shapes_text")
    out = bookmetrics.measure("shapes_text", model, torch.device("cpu"), progress=False, per_prompt=1, scales=(3.0,),
                              base=False)  # the 48 prompts once: about 10 s on one core
    assert "guidance_sweep" not in out and out["experts"]["low"] == "shapes_text_noshift"
    (row,) = out["experts_sweep"]
    assert row["samples"] == 48 and row["all"] >= 0.9, row  # the shifted model alone: about 70%
    stored = pretrained.info("shapes_text")["metrics"]
    assert stored["experts"] == out["experts"] and max(r["all"] for r in stored["experts_sweep"]) >= 0.9


def test_plain_timestep_fraction_mixes_the_two_schedules_noise_levels():
    from vitdiff.diffusion import matching_timesteps

    r = pretrained.CANDIDATES["shapes_text_plain50"]
    shifted = pretrained.recipe_schedule(r)
    table = matching_timesteps(shifted, pretrained.recipe_schedule("shapes_text_noshift"))
    assert pretrained._timestep_sampler(pretrained.recipe("shapes_text"), shifted, torch.device("cpu"))(8) is None
    sample = pretrained._timestep_sampler(r, shifted, torch.device("cpu"))
    torch.manual_seed(0)
    t = sample(20_000)
    low = (t < table[300]).float().mean().item()  # where the plain schedule spends 30% of its draws
    uniform = table[300].item() / 1000
    assert abs(low - (0.5 * uniform + 0.5 * 0.3)) < 0.015, (low, uniform)
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="plain_timestep_fraction"):
            pretrained._timestep_sampler(pretrained._variant("shapes_text", "x", "", 1,
                                                             options={"plain_timestep_fraction": bad}),
                                         shifted, torch.device("cpu"))


def test_stratified_timesteps_put_one_t_in_each_slice_and_stay_uniform_per_sample():
    r = pretrained.CANDIDATES["mnist_ddpm_strat"]
    schedule = pretrained.recipe_schedule(r)
    sample = pretrained._timestep_sampler(r, schedule, torch.device("cpu"))
    torch.manual_seed(0)
    for b in (1, 7, 128):
        t = sample(b)
        assert t.dtype == torch.long and t.shape == (b,) and 0 <= t.min() and t.max() < 1000
        slices = torch.sort(t * b // 1000).values  # which of the B equal slices of [0, T) each t falls in
        assert torch.equal(slices, torch.arange(b)), (b, t)
    first = torch.stack([sample(8)[0] for _ in range(4000)])  # one position across batches: uniform on [0, T)
    assert abs(first.float().mean().item() - 499.5) < 15 and first.min() < 50 and first.max() > 950
    # the recipe's unconditional loss draws its t from this sampler (a model that reads t back sees the slices)
    seen = {}

    def read_t(x, t):
        seen["t"] = t
        return torch.zeros_like(x)
    pretrained.recipe_loss(r, torch.device("cpu"))(read_t, (torch.zeros(16, 1, 28, 28),))
    assert torch.equal(torch.sort(seen["t"] * 16 // 1000).values, torch.arange(16))
    with pytest.raises(ValueError, match="exclude each other"):
        pretrained._timestep_sampler(pretrained._variant("mnist_ddpm", "x", "", 1, options={
            "stratified_timesteps": True, "plain_timestep_fraction": 0.5}),
                                     schedule, torch.device("cpu"))


def test_a_diffusion_recipe_trains_with_its_own_shifted_schedule():
    from vitdiff.diffusion import diffusion_loss

    r = pretrained.recipe("shapes_text")
    plain, shifted = pretrained.recipe_schedule("shapes_text_noshift"), pretrained.recipe_schedule(r)
    assert "shift" not in plain.config and shifted.config["shift"] == r.options["schedule_shift"] == 4.0
    with pytest.raises(ValueError, match="not a diffusion schedule"):
        pretrained.recipe_schedule("shapes_mmdit")
    torch.manual_seed(0)
    model = pretrained.build_model(r)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a fresh U-Net outputs zero, whatever the schedule
    x0, labels = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([[0, 0, 0], [1, 2, 3], [2, 1, 0], [0, 3, 2]])
    torch.manual_seed(1)
    loss = pretrained.recipe_loss(r, torch.device("cpu"))(model, (x0, labels))
    tokenizer = pretrained.shapes_tokenizer()
    for schedule, same in ((shifted, True), (plain, False)):  # the same draws of caption, t and noise by hand
        torch.manual_seed(1)
        variant = torch.multinomial(torch.tensor(r.options["caption_variant_probs"]), 4, replacement=True)
        ids = pretrained.caption_table(tokenizer)[variant, (labels * torch.tensor([16, 4, 1])).sum(dim=1)]
        expected = diffusion_loss(model, schedule, x0, "v", ids=ids, ids_mask=ids != tokenizer.pad_id)
        assert torch.allclose(loss, expected) == same


def test_latent_class_samples_take_the_recipes_own_noise_schedule():
    from vitdiff.diffusion import NoiseSchedule

    torch.manual_seed(0)  # an untrained DiT of the recipe is enough: the test is about which schedule is used
    model = pretrained.build_model(pretrained.recipe("fmnist_dit_eps")).eval()
    labels = torch.tensor([0, 7])
    default = bookmetrics.latent_class_samples(model, "epsilon", labels, steps=4)  # (2, 1, 28, 28) in [0, 1]
    assert default.shape == (2, 1, 28, 28) and 0 <= default.min() and default.max() <= 1
    torch.testing.assert_close(default, bookmetrics.latent_class_samples(
        model, "epsilon", labels, steps=4, schedule=pretrained.recipe_schedule("fmnist_dit_eps")))
    shifted = bookmetrics.latent_class_samples(model, "epsilon", labels, steps=4,
                                               schedule=NoiseSchedule(1000, "linear", shift=3.0))
    assert (shifted - default).abs().max() > 1e-2  # the schedule passed in is the one sampled with
