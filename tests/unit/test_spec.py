"""Job spec validation and the index arithmetic of images and tasks (pure code)."""

import itertools

import pytest
from pydantic import ValidationError

from farm.spec import JobSpec, Plan


def spec(**kw):
    base = {"model": "m", "prompt": "p", "seed": 100}
    base.update(kw)
    return JobSpec(**base)


def test_images_follow_index_arithmetic_against_a_naive_expansion():
    s = spec(
        prompt=["a", "b", "c"],
        count=4,
        sweep={"cfg_scale": [3, 7.5], "steps": [5, 10, 20], "width": [64, 128]},
        batch_size=5,
    )
    plan = Plan(s)
    naive = []
    for cfg, steps, width in itertools.product([3.0, 7.5], [5, 10, 20], [64, 128]):
        for p in ["a", "b", "c"]:
            for r in range(4):
                naive.append((cfg, steps, width, p, 100 + r))
    assert plan.total == len(naive) == 2 * 3 * 2 * 3 * 4
    for k, want in enumerate(naive):
        img = plan.image(k)
        assert (img.cfg_scale, img.steps, img.width, img.prompt, img.seed) == want


def test_tasks_cover_every_image_once_and_never_cross_a_cell():
    s = spec(prompt=["a", "b"], count=7, sweep={"model": ["x", "y", "z"]}, batch_size=4)
    plan = Plan(s)
    seen = []
    for t in range(plan.n_tasks):
        tr = plan.task(t)
        assert 1 <= tr.end - tr.start <= 4
        cells = {plan.image(i).cell for i in range(tr.start, tr.end)}
        models = {plan.image(i).model for i in range(tr.start, tr.end)}
        assert len(cells) == 1 and len(models) == 1
        for i in range(tr.start, tr.end):
            assert plan.task_of(i) == t
        seen.extend(range(tr.start, tr.end))
    assert seen == list(range(plan.total))
    assert plan.models() == ["x", "y", "z"]


@pytest.mark.parametrize(
    "sweep",
    [
        {},
        {"cfg_scale": [3, 5, 7]},
        {"model": ["x", "y"]},
        {"model": ["x", "y", "x"], "steps": [5, 10]},
        {"steps": [5, 10], "model": ["x", "y", "z"], "width": [64, 128]},
        {"width": [64, 128], "cfg_scale": [3, 5], "model": ["y", "x"]},
    ],
)
def test_a_cells_model_matches_its_settings(sweep):
    plan = Plan(spec(sweep=sweep))
    models = [plan.cell_settings(cell)["model"] for cell in range(plan.n_cells)]
    assert [plan.cell_model(cell) for cell in range(plan.n_cells)] == models
    with pytest.raises(IndexError):
        plan.cell_model(plan.n_cells)
    # a model's cells in a range, listed and counted without visiting the others
    for model in ("m", "x", "y", "z", "nope"):
        for start, stop in itertools.combinations(range(plan.n_cells + 2), 2):
            want = [c for c in range(start, min(stop, plan.n_cells)) if models[c] == model]
            assert list(plan.model_cells(model, start, stop)) == want
            assert plan.count_model_cells(model, start, stop) == len(want)


def test_a_million_images_plan_in_constant_time():
    plan = Plan(spec(count=1_000_000, batch_size=8))
    assert plan.total == 1_000_000 and plan.n_tasks == 125_000
    last = plan.task(plan.n_tasks - 1)
    assert (last.start, last.end) == (999_992, 1_000_000)
    assert plan.image(999_999).seed == 100 + 999_999


def test_random_seed_is_resolved_and_recorded():
    s = spec(seed=-1).resolved()
    assert 0 <= s.seed < 2**32
    with pytest.raises(ValueError):
        Plan(spec(seed=-1))


@pytest.mark.parametrize(
    "field,value",
    [
        ("width", 65),
        ("width", 8),
        ("height", 100000),
        ("steps", 0),
        ("cfg_scale", -1),
        ("sampler_name", "Heun 9000"),
        ("scheduler", "Nope"),
        ("priority", 101),
        ("count", 0),
        ("seed", -2),
        ("subseed", -2),
        ("subseed", 2**32),
        ("subseed_strength", 1.01),
        ("subseed_strength", -0.5),
        ("subseed_strength", "half"),
        ("sweep", {"subseed_strength": [0.5, 2]}),
        ("sweep", {"subseed": [-1]}),
        ("seed_resize_from_w", 100),
        ("seed_resize_from_h", 256),  # without a width
        ("eta_noise_seed_delta", -1),
        ("eta_noise_seed_delta", 2**32),
        ("batch_size", 0),
        ("output_prefix", "../etc"),
        ("sweep", {"prompt": ["x"]}),
        ("sweep", {"cfg_scale": []}),
        ("sweep", {"steps": [10, -1]}),
        ("prompt", []),
        ("model", "bad name!"),
    ],
)
def test_invalid_fields_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValidationError) as err:
        spec(**{field: value})
    locs = [e["loc"][0] for e in err.value.errors()]
    assert field in locs


def test_total_over_the_limit_is_rejected():
    with pytest.raises(ValidationError, match="images; at most"):
        spec(count=10_000_000, prompt=["a", "b"])


def test_variation_seeds_keep_the_seed_and_count_the_subseed_up_as_a1111():
    plain = Plan(spec(count=3, subseed=500))
    assert [(plain.image(i).seed, plain.image(i).subseed_strength) for i in range(3)] == [
        (100, 0.0), (101, 0.0), (102, 0.0)
    ]  # fmt: skip
    varied = Plan(spec(count=3, subseed=500, subseed_strength=0.3))
    images = [varied.image(i) for i in range(3)]
    assert [(p.seed, p.subseed, p.subseed_strength) for p in images] == [
        (100, 500, 0.3), (100, 501, 0.3), (100, 502, 0.3)
    ]  # fmt: skip
    # swept: a cell of strength 0 is a plain one, the others vary from the cell's subseed
    swept = Plan(
        spec(count=2, subseed=7, sweep={"subseed_strength": [0, 0.5], "subseed": [10, 20]})
    )
    got = [(p.seed, p.subseed, p.subseed_strength) for p in map(swept.image, range(8))]
    assert got == [
        (100, 10, 0.0), (101, 10, 0.0), (100, 20, 0.0), (101, 20, 0.0),
        (100, 10, 0.5), (100, 11, 0.5), (100, 20, 0.5), (100, 21, 0.5),
    ]  # fmt: skip
    assert spec(subseed_strength=0.5).needs() == {"variation_seeds"}
    assert spec(sweep={"subseed_strength": [0, 0.1]}).needs() == {"variation_seeds"}
    assert spec(subseed=5, sweep={"subseed": [1, 2]}).needs() == frozenset()


def test_a_random_subseed_is_resolved_only_when_it_is_used():
    assert spec(subseed=-1).resolved().subseed == -1  # no strength: nothing to pick
    varied = spec(seed=-1, subseed=-1, subseed_strength=0.2)
    with pytest.raises(ValueError, match="subseed"):
        Plan(spec(subseed=-1, subseed_strength=0.2))
    resolved = varied.resolved()
    assert 0 <= resolved.seed < 2**32 and 0 <= resolved.subseed < 2**32
    assert resolved.resolved() is resolved
    assert Plan(resolved).image(0).subseed == resolved.subseed


def test_farm_submit_takes_variation_seed_flags():
    from farm.cli import build_parser, spec_from_args
    from farm.config import Config

    args = build_parser().parse_args(
        ["submit", "--prompt", "x", "--subseed", "9", "--subseed-strength", "0.4"]
    )
    job = JobSpec(**spec_from_args(args, Config.from_env()))
    assert (job.subseed, job.subseed_strength) == (9, 0.4)
    plain = spec_from_args(build_parser().parse_args(["submit", "--prompt", "x"]), Config())
    assert "subseed" not in plain and "subseed_strength" not in plain


def test_a_seed_resize_goes_to_every_image_and_needs_workers_that_render_it():
    resized = spec(count=2, seed_resize_from_w=768, seed_resize_from_h=512)
    assert [Plan(resized).image(i).seed_resize_from for i in (0, 1)] == [(768, 512)] * 2
    assert Plan(spec()).image(0).seed_resize_from is None
    assert resized.needs() == {"seed_resize"}
    with pytest.raises(ValidationError, match="seed_resize_from_h"):
        spec(seed_resize_from_w=768)


def test_farm_submit_takes_seed_resize_from():
    from farm.cli import build_parser, spec_from_args
    from farm.config import Config

    def parsed(value):
        args = build_parser().parse_args(["submit", "--prompt", "x", "--seed-resize-from", value])
        return spec_from_args(args, Config())

    job = JobSpec(**parsed("768x512"))
    assert (job.seed_resize_from_w, job.seed_resize_from_h) == (768, 512)
    for bad in ("768", "768x", "ax512", "768*512"):
        with pytest.raises(SystemExit, match="--seed-resize-from"):
            parsed(bad)


def test_ensd_goes_to_every_image_and_to_the_cli():
    from farm.cli import build_parser, spec_from_args
    from farm.config import Config

    job = spec(count=2, eta_noise_seed_delta=31337)
    assert [Plan(job).image(i).eta_noise_seed_delta for i in (0, 1)] == [31337, 31337]
    assert job.needs() == {"ensd"} and spec().needs() == frozenset()
    args = build_parser().parse_args(["submit", "--prompt", "x", "--ensd", "31337"])
    assert JobSpec(**spec_from_args(args, Config())).eta_noise_seed_delta == 31337


INIT = "ab" * 32
MASK = "cd" * 32


@pytest.mark.parametrize(
    "inpaint,loc",
    [
        ({"mask": "not-a-hash"}, "mask"),
        ({}, "mask"),  # the mask is what inpainting is
        ({"mask": MASK, "mask_blur": -1}, "mask_blur"),
        ({"mask": MASK, "mask_blur": 65}, "mask_blur"),
        ({"mask": MASK, "masked_content": "smudge"}, "masked_content"),
        ({"mask": MASK, "padding": 257}, "padding"),
        ({"mask": MASK, "padding": -1}, "padding"),
        ({"mask": MASK, "invert_mask": "maybe"}, "invert_mask"),
        ({"mask": MASK, "feather": 3}, "feather"),
    ],
)
def test_bad_inpaint_fields_are_named(inpaint, loc):
    with pytest.raises(ValidationError) as err:
        spec(init_image=INIT, inpaint=inpaint)
    assert ("inpaint", loc) in [tuple(e["loc"][:2]) for e in err.value.errors()], err.value


def test_inpaint_needs_an_init_image_and_goes_to_every_image_and_to_the_cli():
    from farm.cli import build_parser, spec_from_args
    from farm.config import Config

    with pytest.raises(ValidationError) as err:
        spec(inpaint={"mask": MASK})
    assert [e["loc"][0] for e in err.value.errors()] == ["inpaint"]
    job = spec(count=2, init_image=INIT, inpaint={"mask": MASK, "masked_content": "fill"})
    inpaint = job.inpaint
    assert (inpaint.mask_blur, inpaint.only_masked, inpaint.padding, inpaint.invert_mask) == (
        4, False, 32, False)  # fmt: skip
    assert [Plan(job).image(i).inpaint for i in (0, 1)] == [inpaint, inpaint]
    assert job.needs() == {"img2img", "inpaint"}
    args = build_parser().parse_args(
        ["submit", "--prompt", "x", "--mask-blur", "8", "--masked-content", "latent noise",
         "--only-masked", "--padding", "16", "--invert-mask"]
    )  # fmt: skip
    fields = spec_from_args(args, Config())["inpaint"]
    assert fields == {"mask_blur": 8, "masked_content": "latent noise", "invert_mask": True,
                      "only_masked": True, "padding": 16}  # fmt: skip
    args = build_parser().parse_args(["submit", "--prompt", "x"])
    assert "inpaint" not in spec_from_args(args, Config())
    # as a worker reads a stored spec back (model_construct): the mask settings, not a dict
    stored = JobSpec.model_construct(**job.model_dump())
    assert Plan(stored).image(1).inpaint == inpaint
