"""dataset=imagefolder (core/images.py): folders of class folders, per site, through Hugging
Face `datasets`' imagefolder loader, trained with the CNN; the layout, the classes and the
files are checked before anything trains, naming what is wrong."""

import pytest

from app.config import load_config
from core.config import ConfigError
from core.data import centralized_evaluation_data, data_spec, load_client_data, load_file_data
from tests.support.rounds import in_process_run

from tests.support.images import CLASSES, write_digits


def overrides(path, *extra):
    return " ".join([f"dataset=imagefolder dataset.path={path} dataset.classes=[{','.join(CLASSES)}]",
                     "dataset.image_size=[8,8]", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_digits(root / "sites", sites=["a", "b", "c"], per_class=12)
    write_digits(root / "test", per_class=15, seed=1)
    write_digits(root / "big", per_class=5, seed=2, size=(32, 24))  # other sizes are resized
    return root


def test_sites_become_partitions_and_a_cnn_learns_them(folders, tmp_path):
    cfg = load_config(overrides(folders / "sites", "dataset.by_site=true model=cnn"))
    assert data_spec(cfg.dataset).image_shape == (1, 8, 8)
    sizes = [len(load_client_data(cfg.dataset, cfg.partitioner, i, 3, 0)[0]) for i in range(3)]
    assert sum(sizes) + sum(len(load_client_data(cfg.dataset, cfg.partitioner, i, 3, 0)[1]) for i in range(3)) == 108
    run = in_process_run(
        overrides(folders / "sites", f"dataset.by_site=true dataset.test_path={folders / 'test'} "
                  "model=cnn num_rounds=8 strategy.fraction_train=1.0 training.local_epochs=3"),
        tmp_path, num_nodes=3, seed=0, centralized_test=True,
    ).fit()  # fmt: skip
    final = run.recorder.record.rounds[-1].centralized
    assert final["accuracy"] > 0.8  # three digit classes: chance is 0.33
    assert {"recall_0", "recall_1", "recall_2", "f1", "ece"} <= set(final)


def test_images_are_converted_and_resized_to_the_declared_input(folders):
    cfg = load_config(overrides(folders / "big", "dataset.channels=3 dataset.image_size=[6,5]"))
    test = centralized_evaluation_data(load_config(overrides(folders / "big", f"dataset.test_path={folders / 'big'}")).dataset, 0)
    assert test.x.shape == (15, 64) and test.x.min() >= 0 and test.x.max() <= 1
    train, val = load_file_data(str(folders / "big"), cfg.dataset, 0)  # a site's own folder
    assert train.x.shape[1] == 3 * 6 * 5 and len(train) + len(val) == 15
    assert sorted(set(train.y.tolist())) == [0, 1, 2]


def test_a_class_folder_that_is_not_declared_is_named(folders, tmp_path):
    write_digits(tmp_path / "imgs", per_class=3)
    (tmp_path / "imgs" / "one").rename(tmp_path / "imgs" / "uno")
    cfg = load_config(overrides(tmp_path / "imgs"))
    with pytest.raises(ValueError, match=r"class folders \['uno'\] are not among dataset.classes"):
        load_file_data(str(tmp_path / "imgs"), cfg.dataset, 0)


def test_a_wrong_layout_and_a_broken_image_are_named(tmp_path):
    write_digits(tmp_path / "flat", per_class=3)
    cfg = load_config(overrides(tmp_path / "flat", "dataset.by_site=true"))
    with pytest.raises(ValueError, match=r"laid out as <site>/<class>/<image> \(dataset.by_site=true\)"):
        load_client_data(cfg.dataset, cfg.partitioner, 0, 3, 0)
    (tmp_path / "flat" / "two" / "broken.png").write_bytes(b"not a png")
    cfg = load_config(overrides(tmp_path / "flat"))
    with pytest.raises(ValueError, match="a file in 'two' is not a readable image"):
        load_file_data(str(tmp_path / "flat"), cfg.dataset, 0)


@pytest.mark.parametrize("extra,says", [
    ("dataset.classes=[only]", "dataset.classes=['only']: declare the class folders' names"),
    ("dataset.channels=2", "dataset.channels=2: must be 1 (grayscale) or 3 (RGB)"),
    ("dataset.image_size=[8]", "dataset.image_size=[8]: must be [height, width]"),
    ("dataset.path=relative/images", "dataset.path='relative/images': must be an absolute path"),
])  # fmt: skip
def test_the_declaration_is_checked_at_config_time(extra, says):
    with pytest.raises(ConfigError) as err:
        load_config(overrides("/abs/images", extra))
    assert says in str(err.value)


def test_folder_names_like_test_or_a_metadata_file_lose_no_image(tmp_path):
    """Hugging Face's imagefolder reads folder names such as test/val/dev as splits and a
    metadata.csv as the list of images when given a folder: every image here is still read."""
    write_digits(tmp_path / "s", sites=["hospital-test", "dev", "training-center"], per_class=2)
    for site in ("hospital-test", "dev", "training-center"):
        (tmp_path / "s" / site / "one").rename(tmp_path / "s" / site / "val")
    (tmp_path / "s" / "metadata.csv").write_text("file_name,label\nhospital-test/zero/0-0.png,0\n")
    cfg = load_config(overrides(tmp_path / "s", "dataset.by_site=true").replace("[zero,one,two]", "[zero,val,two]"))
    from core.images import read_folder

    x, y, sites = read_folder(tmp_path / "s", cfg.dataset, "dataset.path", by_site=True)
    assert len(y) == 18 and sorted(set(sites)) == ["dev", "hospital-test", "training-center"]
    assert sorted(set(y.tolist())) == [0, 1, 2]


def test_sixteen_bit_images_are_scaled_by_their_depth_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from core.images import read_folder

    for name, value in (("zero", 1000), ("one", 60000), ("two", 30000)):
        (tmp_path / "d" / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(tmp_path / "d" / name / "a.png")
    cfg = load_config(overrides(tmp_path / "d"))
    x, y, _ = read_folder(tmp_path / "d", cfg.dataset, "dataset.path")
    means = {int(k): float(x[y == k].mean()) for k in set(y.tolist())}
    assert means[0] == pytest.approx(1000 / 65535, abs=1e-4) and means[1] == pytest.approx(60000 / 65535, abs=1e-4)
