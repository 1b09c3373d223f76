"""Every image file a folder or CSV holds is read as a viewer shows it, or refused or noted as skipped
in one line: EXIF orientation, 16-bit colour, float with NaN, WebP / GIF / JPEG 2000 / Netpbm,
links and loops, DICOM recognised by content under any name, colour DICOM (RGB, YBR, palette, RLE,
JPEG) and a CT window that would flatten the slice. The files are written here, from a real
BreastMNIST image."""
import hashlib
import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from common import convert
from conftest import run_cli


@pytest.fixture
def picture(real_root):
    """A real 64 x 64 BreastMNIST ultrasound image: no turn or flip leaves it unchanged."""
    with np.load(os.path.join(real_root, "breastmnist_64.npz")) as npz:
        x = npz["train_images"][0]
    assert not any(np.array_equal(x, f(x)) for f in (np.fliplr, np.flipud, np.transpose))
    return x


def colour(picture):
    """An RGB picture: the gray image in every channel, with a red square in its middle."""
    x = np.repeat(picture[..., None], 3, axis=2)
    x[24:40, 24:40] = (230, 20, 20)
    return x


def read(path, size=64, crop="center"):
    """convert_one of `path`: (pixels, notes); the read must succeed."""
    notes = []
    x, error = convert.convert_one(str(path), size, crop, notes)
    assert error is None, error
    return x, notes


def stretch(x):
    """x stretched from its minimum to its maximum over 0..255 (the rule for images without a range)."""
    x = np.asarray(x, np.float64)
    return np.round((x - x.min()) * (255 / (x.max() - x.min())))


def files_of(folder):
    """{path: (size, mtime, sha256)} of every file under `folder` (links followed once, not into loops)."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                s = os.stat(path)
                out[path] = (s.st_size, s.st_mtime_ns, hashlib.sha256(open(path, "rb").read()).hexdigest())
    return out


def write_png16(path, x):
    """A 16-bit PNG of uint16 (H, W, C), written by hand (Pillow writes no 16-bit colour PNG), its rows
    filtered by each of PNG's five filters in turn (None, Sub, Up, Average, Paeth; PNG spec section 9)."""
    h, w, c = x.shape
    rows = np.ascontiguousarray(x, ">u2").reshape(h, w * c).view(np.uint8).astype(np.int64)
    step, prev, data = 2 * c, np.zeros(rows.shape[1], np.int64), bytearray()
    for r, cur in enumerate(rows):
        kind = r % 5
        left = np.concatenate([np.zeros(step, np.int64), cur[:-step]])
        upleft = np.concatenate([np.zeros(step, np.int64), prev[:-step]])
        p = left + prev - upleft
        paeth = np.where((abs(p - left) <= abs(p - prev)) & (abs(p - left) <= abs(p - upleft)), left,
                         np.where(abs(p - prev) <= abs(p - upleft), prev, upleft))
        guess = (0 * cur, left, prev, (left + prev) // 2, paeth)[kind]
        data += bytes([kind]) + ((cur - guess) % 256).astype(np.uint8).tobytes()
        prev = cur

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(bytes(data))) + chunk(b"IEND", b""))


def write_dicom(path, pixels, photometric="MONOCHROME2", syntax=None, shape=None, data=None, **attrs):
    """A DICOM file of `pixels` as stored (uint8 / uint16 / int16, (H, W) or (H, W, 3)), or of their
    encapsulated `data` in a compressed transfer `syntax`; `attrs`: more tags."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = shape or pixels.shape[:2]
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.tobytes() if data is None else data
    if data is not None:
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return ds


# ---------------------------------------------------------------- EXIF orientation
STORED = {  # EXIF orientation -> the pixels a camera stores for an upright picture u (EXIF 2.3, tag 0x0112)
    2: np.fliplr, 3: lambda u: np.rot90(u, 2), 4: np.flipud, 5: lambda u: np.swapaxes(u, 0, 1),
    6: lambda u: np.rot90(u, 1), 7: lambda u: np.swapaxes(np.rot90(u, 2), 0, 1), 8: lambda u: np.rot90(u, -1)}


@pytest.mark.parametrize("fmt, options", [("png", {}), ("tif", {}), ("webp", {"lossless": True}),
                                          ("jpg", {"quality": 100})])
@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_turns_the_picture_upright(picture, tmp_path, fmt, options, orientation):
    upright = picture[:, 8:56]  # 64 x 48: a turn by 90 degrees also swaps the sides
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(STORED[orientation](upright))).save(tmp_path / f"a.{fmt}", exif=exif,
                                                                             **options)
    x, notes = read(tmp_path / f"a.{fmt}", 64, "pad")  # padded left and right when upright, not above and below
    expected = np.pad(upright, ((0, 0), (8, 8)))
    error = np.abs(x.astype(int) - expected).mean()
    assert error < (1.5 if fmt == "jpg" else 1e-9) and notes == []
    assert np.abs(x.astype(int) - np.pad(upright[::-1, ::-1], ((0, 0), (8, 8)))).mean() > 10 * max(error, 1)


# ---------------------------------------------------------------- bit depth and range
def test_the_hand_written_16_bit_png_is_what_pillow_reads(tmp_path):
    x = np.random.default_rng(0).integers(0, 65536, (9, 7, 1), dtype=np.uint16)
    write_png16(tmp_path / "g.png", x)
    with Image.open(tmp_path / "g.png") as img:  # Pillow reads 16-bit gray in full
        assert img.mode == "I;16" and np.array_equal(np.asarray(img), x[..., 0])


def _tiff(**options):
    def write(path, x):
        tifffile = pytest.importorskip("tifffile")
        planar = options.get("planarconfig") == "separate"  # tifffile takes planes first
        tifffile.imwrite(path, np.moveaxis(x, -1, 0) if planar else x, photometric="rgb", **options)
    return write


@pytest.mark.parametrize("name, write", [
    ("a.png", write_png16),
    ("rgba.png", lambda path, x: write_png16(path, np.dstack([x, np.full(x.shape[:2], 65535, np.uint16)]))),
    ("a.tif", _tiff()),
    ("zlib.tif", _tiff(compression="zlib", predictor=True)),   # decoded through libtiff
    ("bigendian.tif", _tiff(byteorder=">")),
    ("planar.tif", _tiff(planarconfig="separate")),         # which Pillow cannot unpack at 16 bits
])
def test_16_bit_colour_keeps_its_full_depth_over_its_full_range(picture, tmp_path, name, write):
    ramp = np.round(np.linspace(0, 65535, 64)).astype(np.uint16)
    x = np.dstack([picture.astype(np.uint16) * 257,            # 8-bit values at 16 bits: exactly the picture
                   np.broadcast_to(ramp, (64, 64)),            # a ramp over the whole 16-bit range
                   np.full((64, 64), 4095, np.uint16)])        # 12-bit white: dark, as a viewer shows it
    write(str(tmp_path / name), x)
    y, notes = read(tmp_path / name)
    assert y.shape == (64, 64, 3) and notes == []
    assert np.array_equal(y[..., 0], picture)
    assert y[..., 1].min() == 0 and y[..., 1].max() == 255
    assert np.array_equal(y[0, :, 1], np.round(ramp / 65535 * 255).astype(np.uint8))
    assert (y[..., 2] == round(4095 / 65535 * 255)).all()


@pytest.mark.parametrize("layout", ["contig", "separate"])  # read by Pillow, which turns it; by tifffile: not
def test_a_16_bit_colour_tiff_turned_by_its_tag_lands_upright(picture, tmp_path, layout):
    tifffile = pytest.importorskip("tifffile")
    upright = np.dstack([picture.astype(np.uint16) * 257] * 2 + [np.zeros((64, 64), np.uint16)])[:, 8:56]
    stored = np.rot90(upright, 1)  # EXIF / TIFF orientation 6: turned 90 degrees clockwise to be seen
    tifffile.imwrite(tmp_path / "t.tif", np.moveaxis(stored, -1, 0) if layout == "separate" else stored,
                     photometric="rgb", planarconfig=layout, extratags=[(0x0112, "H", 1, 6, True)])
    x, _ = read(tmp_path / "t.tif", 64, "pad")
    assert np.array_equal(x[:, 8:56, 0], picture[:, 8:56]) and (x[:, :8] == 0).all()


def test_16_bit_gray_is_stretched_over_its_own_range(tmp_path):
    x = np.broadcast_to(np.arange(0, 4096, 64, dtype=np.uint16), (64, 64))  # 12 bits in a 16-bit file
    write_png16(tmp_path / "g.png", x[..., None])
    y, _ = read(tmp_path / "g.png")
    assert y.min() == 0 and y.max() == 255 and np.array_equal(y[0], stretch(x[0]))


def test_a_float_tiff_with_nan_and_infinity_keeps_its_picture_and_says_so(picture, tmp_path, capsys):
    x = picture.astype(np.float32) * 0.01 - 0.5
    x[0, 0], x[0, 1], x[1, 0] = np.nan, np.inf, -np.inf
    Image.fromarray(x, mode="F").save(tmp_path / "nan.tif")
    Image.fromarray(picture).save(tmp_path / "fine.png")
    y, notes = read(tmp_path / "nan.tif")
    finite = np.isfinite(x)
    assert notes == [convert.NON_FINITE] and (y[~finite] == 0).all()
    assert np.abs(y[finite] - stretch(x[finite])).max() <= 1 and y.std() > 20  # not a constant image
    images, _ = convert.convert_images([str(tmp_path / "fine.png"), str(tmp_path / "nan.tif")], 64, "center",
                                       processes=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert lines == [f"note: 1 of 2 images {convert.NON_FINITE} (first: {tmp_path / 'nan.tif'})"]
    assert np.array_equal(images[1], y)


# ---------------------------------------------------------------- formats
def _save(fmt, mode=None, **options):
    def write(path, picture):
        img = Image.fromarray(picture)
        (img.convert(mode) if mode else img).save(path, format=fmt, **options)
    return write


@pytest.mark.parametrize("name, write", [
    ("a.webp", _save("WEBP", lossless=True)),
    ("a.gif", _save("GIF")),
    ("a.bmp", _save("BMP")),
    ("a.pgm", _save("PPM")),
    ("a.tif", _save("TIFF", compression="tiff_lzw")),
    ("palette.png", _save("PNG", "P")),
    ("rgb.png", _save("PNG", "RGB")),
    ("alpha.png", _save("PNG", "LA")),
    ("a.jp2", _save("JPEG2000")),
])
def test_each_format_gives_the_picture_exactly(picture, tmp_path, name, write):
    if name.endswith(".jp2") and not features.check("jpg_2000"):
        pytest.skip("this Pillow has no JPEG 2000")
    write(tmp_path / name, picture)
    x, notes = read(tmp_path / name)
    assert np.array_equal(x, picture) and notes == []


def test_colour_webp_and_gif_stay_colour(picture, tmp_path):
    rgb = colour(picture)
    Image.fromarray(rgb).save(tmp_path / "a.webp", quality=90)
    Image.fromarray(rgb).save(tmp_path / "a.gif")
    for name in ("a.webp", "a.gif"):
        x, _ = read(tmp_path / name)
        assert x.shape == (64, 64, 3)
        assert np.abs(x[28:36, 28:36].astype(int) - (230, 20, 20)).max() < 25  # the red square stays red


@pytest.mark.parametrize("name", ["anim.gif", "anim.webp", "anim.png", "pages.tif"])
def test_a_file_of_several_frames_gives_its_first_with_a_note(picture, tmp_path, name):
    frames = [Image.fromarray(picture), Image.fromarray(255 - picture)]
    options = {"lossless": True} if name.endswith(".webp") else {}
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], **options)
    x, notes = read(tmp_path / name)
    assert np.array_equal(x, picture) and notes == [convert.FIRST_FRAME]


# ---------------------------------------------------------------- a folder: names, links, loops
UID_NAME = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"


def test_every_file_of_a_folder_is_read_or_noted_as_skipped(picture, tmp_path, capsys):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for d in (data / "0_a" / "sub", data / "1_b", elsewhere / "more"):
        os.makedirs(d)
    Image.fromarray(picture).save(data / "0_a" / "plain.png")
    Image.fromarray(picture).save(elsewhere / "linked.png")
    Image.fromarray(255 - picture).save(elsewhere / "more" / "in_linked_folder.png")
    os.symlink(elsewhere / "linked.png", data / "0_a" / "link.png")       # a link to a file: followed
    os.symlink(elsewhere / "more", data / "0_a" / "sub" / "more")         # a link to a folder: followed
    os.symlink(elsewhere / "more", data / "0_a" / "sub" / "more_again")   # the same folder again: taken once
    os.symlink("..", data / "0_a" / "sub" / "up")                         # back to 0_a: a loop
    os.symlink(data, data / "0_a" / "sub" / "top")                        # back to the data folder: a loop
    os.symlink("gone.png", data / "0_a" / "broken.png")
    (data / "0_a" / "notes.txt").write_text("not an image")
    (data / "0_a" / "scan.xyz").write_bytes(b"\0" * 200)
    (data / "0_a" / ".DS_Store").write_bytes(b"\0")
    # a PACS export: DICOM files under UID names and IMG0001.IMA, and its DICOMDIR index
    for name in (UID_NAME, "IMG0001.IMA"):
        write_dicom(data / "1_b" / name, picture)
    write_dicom(data / "1_b" / "DICOMDIR", picture[:2, :2])
    before = files_of(data)

    listing = convert.list_folder(str(data))
    names = [os.path.relpath(p, data) for p in listing.paths]
    assert names == ["0_a/link.png", "0_a/plain.png", "0_a/sub/more/in_linked_folder.png", f"1_b/{UID_NAME}",
                     "1_b/IMG0001.IMA"]
    assert listing.labels.tolist() == [0, 0, 0, 1, 1]
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith(f"note: {data}: skipped ")]
    expected = ["1 hidden file or folder", "2 files that are neither images nor DICOM (.txt 1, .xyz 1)",
                "1 broken link", "2 folder links back to a folder that holds them", "1 DICOMDIR index file",
                f"1 folder reached a second time through a link (its images are taken once), first: "
                f"{data / '0_a' / 'sub' / 'more_again'}"]
    assert len(notes) == len(expected) and all(any(e in n for n in notes) for e in expected), out
    images, n_gray = convert.convert_images(listing.paths, 64, "center", processes=1)
    assert n_gray == 5 and [np.array_equal(x, p) for x, p in zip(images, [picture, picture, 255 - picture,
                                                                          picture, picture])] == [True] * 5
    assert files_of(data) == before  # nothing written, copied or changed in the user's folder


def test_a_folder_of_only_uid_named_dicom_is_a_source(picture, tmp_path):
    os.makedirs(tmp_path / "export")
    for i in range(3):
        write_dicom(tmp_path / "export" / f"{UID_NAME}.{i}", picture)
    listing = convert.list_folder(str(tmp_path / "export"))
    assert len(listing.paths) == 3 and listing.task == "unlabeled"
    assert np.array_equal(read(listing.paths[0])[0], picture)


def test_a_class_folder_that_is_a_loop_is_refused_in_one_line(picture, tmp_path):
    os.makedirs(tmp_path / "d" / "a")
    Image.fromarray(picture).save(tmp_path / "d" / "a" / "x.png")
    os.symlink(".", tmp_path / "d" / "b")  # "class" b is the data folder itself
    with pytest.raises(convert.UserError, match=r"class folder .*/b holds no images .*skipped 1 folder link back "
                                                r"to a folder that holds it") as e:
        convert.list_folder(str(tmp_path / "d"))
    assert "\n" not in str(e.value)


def test_split_folders_note_what_is_beside_them_and_refuse_loose_images(picture, tmp_path, capsys):
    for split in ("train", "val", "test"):
        for label in ("a", "b"):
            os.makedirs(tmp_path / "d" / split / label)
            Image.fromarray(picture).save(tmp_path / "d" / split / label / "x.png")
    os.makedirs(tmp_path / "d" / "masks")
    (tmp_path / "d" / "train" / "readme.txt").write_text("the split's notes")
    assert len(convert.list_folder(str(tmp_path / "d")).paths) == 6
    out = capsys.readouterr().out
    assert f"skipped 1 folder beside the split folders, first: {tmp_path / 'd' / 'masks'}" in out
    assert "skipped 1 file that is neither an image nor DICOM (.txt 1)" in out
    Image.fromarray(picture).save(tmp_path / "d" / "train" / "stray.png")  # in no class folder
    with pytest.raises(convert.UserError, match=r"train holds both class folders and 1 loose images \(first: "
                                                r"stray.png\); move the images into class folders"):
        convert.list_folder(str(tmp_path / "d"))


# ---------------------------------------------------------------- DICOM
def _ybr(rgb):
    from pydicom.pixels import convert_color_space
    return convert_color_space(rgb, "RGB", "YBR_FULL")


def _ybr_422(path, rgb):  # each pair of pixels stored as Y1 Y2 Cb Cr (PS3.3 C.7.6.3.1.2)
    y = _ybr(rgb).astype(np.int64)
    cb, cr = ((y[:, 0::2, k] + y[:, 1::2, k] + 1) // 2 for k in (1, 2))
    packed = np.stack([y[:, 0::2, 0], y[:, 1::2, 0], cb, cr], axis=-1).astype(np.uint8)
    write_dicom(path, packed, "YBR_FULL_422", shape=rgb.shape[:2])


def _palette(path, rgb):
    """Indices 0..127 into a gray ramp of even levels, the square index 200, a pure red; returns what it shows."""
    index = (rgb[..., 1] // 2).astype(np.uint8)
    index[24:40, 24:40] = 200
    table = np.arange(256, dtype=np.uint16) * 2 * 257
    red, green, blue = table.copy(), table.copy(), table.copy()
    red[200], green[200], blue[200] = 65535, 0, 0
    tags = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in ("Red", "Green", "Blue")}
    tags.update({f"{c}PaletteColorLookupTableData": t.tobytes() for c, t in zip(("Red", "Green", "Blue"),
                                                                                 (red, green, blue))})
    write_dicom(path, index, "PALETTE COLOR", **tags)
    shown = np.repeat(index[..., None] * 2, 3, axis=2)
    shown[24:40, 24:40] = (255, 0, 0)
    return shown


def _rle(path, rgb):
    from pydicom.uid import RLELossless
    ds = write_dicom(path, rgb, "RGB")
    ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)


def _jpeg(path, rgb):  # ultrasound's usual form: JPEG baseline, YBR_FULL_422
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, subsampling=1)
    write_dicom(path, rgb, "YBR_FULL_422", syntax=JPEGBaseline8Bit, data=encapsulate([buf.getvalue()]))


@pytest.mark.parametrize("kind, write, error", [  # error: the largest difference, or the mean one for JPEG
    ("RGB", lambda path, rgb: write_dicom(path, rgb, "RGB"), ("max", 0)),
    ("RGB 16-bit", lambda path, rgb: write_dicom(path, rgb.astype(np.uint16) * 257, "RGB"), ("max", 0)),
    ("YBR_FULL", lambda path, rgb: write_dicom(path, _ybr(rgb), "YBR_FULL"), ("max", 2)),
    ("YBR_FULL_422", _ybr_422, ("max", 3)),
    ("PALETTE COLOR", _palette, ("max", 1)),
    ("RGB, RLE Lossless", _rle, ("max", 0)),
    ("YBR_FULL_422, JPEG Baseline", _jpeg, ("mean", 4)),
])
def test_colour_dicom_stays_colour(picture, tmp_path, kind, write, error):
    rgb = colour(picture)
    shown = write(str(tmp_path / UID_NAME), rgb)
    expected = shown if kind == "PALETTE COLOR" else rgb
    x, notes = read(tmp_path / UID_NAME)
    assert x.shape == (64, 64, 3) and notes == []
    square = x[28:36, 28:36].reshape(-1, 3)
    assert (square[:, 0] > 200).all() and (square[:, 1:] < 45).all()  # red stays red
    statistic, bound = error
    assert getattr(np.abs(x.astype(int) - expected), statistic)() <= bound


@pytest.mark.parametrize("kind", ["MONOCHROME2", "MONOCHROME1", "bare dataset"])
def test_gray_dicom_under_any_name_and_monochrome1(picture, tmp_path, kind):
    if kind == "bare dataset":  # an older export: no preamble, no "DICM", no file meta, named .dcm
        ds = write_dicom(tmp_path / "a.dcm", picture)
        del ds.file_meta
        ds.save_as(tmp_path / "a.dcm", implicit_vr=True, little_endian=True)
        assert open(tmp_path / "a.dcm", "rb").read(132)[128:] != b"DICM"
        name = "a.dcm"
    else:
        write_dicom(tmp_path / "IMG0001.IMA", picture, kind)
        name = "IMG0001.IMA"
    x, _ = read(tmp_path / name)
    assert np.array_equal(x, 255 - picture if kind == "MONOCHROME1" else picture)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_a_ct_window_that_would_flatten_the_slice_gives_way_to_its_own_range(picture, tmp_path, photometric):
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    hu = picture.astype(np.int16) * 4 - 1000  # air -1000 HU to soft tissue, +20 HU
    stored = (hu + 1024).astype(np.uint16)
    ct = {"Modality": "CT", "RescaleIntercept": -1024, "RescaleSlope": 1}
    flip = (lambda x: 255 - x) if photometric == "MONOCHROME1" else (lambda x: x)

    # a stored window 1 HU wide at +40 HU: a plain linear window shows this slice as one flat grey
    ds = write_dicom(tmp_path / "narrow.dcm", stored, photometric, WindowCenter=40, WindowWidth=1, **ct)
    plain = apply_voi_lut(apply_modality_lut(stored, ds), ds)
    assert plain.std() / (65535 + 1024 - (-1024)) * 255 < 1
    x, notes = read(tmp_path / "narrow.dcm")
    assert notes == [convert.WINDOW_UNFIT]
    assert x.std() > 20 and np.array_equal(x, flip(stretch(hu)))

    # a window that fits the slice (-500 HU, 1000 wide) is used as stored: pydicom's windowing to 0..255
    ds = write_dicom(tmp_path / "fits.dcm", stored, photometric, WindowCenter=-500, WindowWidth=1000, **ct)
    y_min, y_max = -1024, 65535 - 1024  # pydicom's output range: the stored range, rescaled
    reference = (apply_voi_lut(apply_modality_lut(stored, ds), ds) - y_min) / (y_max - y_min) * 255
    x, notes = read(tmp_path / "fits.dcm")
    assert notes == [] and np.abs(x.astype(int) - flip(np.round(reference))).max() <= 1 and x.std() > 20


# ---------------------------------------------------------------- refusals: one line naming the file and the fix
def _gray_alpha_16(folder, picture):
    x = np.dstack([picture.astype(np.uint16) * 257, np.full((64, 64), 65535, np.uint16)])
    write_png16(folder / "gray_alpha_16.png", x)
    return "gray_alpha_16.png", "save it as 16-bit gray (without alpha) or as 8-bit colour"


def _dicom_without_pixels(folder, picture):
    ds = write_dicom(folder / UID_NAME, picture[:2, :2])
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.save_as(folder / UID_NAME, enforce_file_format=True)
    return UID_NAME, "a DICOM file without pixels (Basic Text SR Storage); list only image files"


def _multi_frame_dicom(folder, picture):
    write_dicom(folder / "cine.dcm", np.stack([picture, 255 - picture]), shape=(64, 64), NumberOfFrames=2)
    return "cine.dcm", "multi-frame DICOM; export its frames as single images"


def _not_an_image(folder, picture):
    (folder / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return "scan.png", "Pillow cannot identify it as an image"


@pytest.mark.parametrize("bad", [_gray_alpha_16, _dicom_without_pixels, _multi_frame_dicom, _not_an_image])
def test_a_file_that_cannot_be_read_as_shown_is_refused_in_one_line(picture, tmp_path, bad):
    name, reason = bad(tmp_path, picture)
    with pytest.raises(convert.UserError) as e:
        convert.convert_images([str(tmp_path / name)], 64, "center", processes=1)
    message = str(e.value)
    assert message.startswith(f"cannot read image {tmp_path / name} (") and reason in message, message
    assert message.endswith("replace or remove the file") and "\n" not in message


def test_a_pacs_export_with_a_report_stops_the_script_in_one_line_and_changes_nothing(picture, tmp_path):
    data = tmp_path / "export"
    os.makedirs(data)
    for i in range(8):
        write_dicom(data / f"{UID_NAME}.{i}", np.roll(picture, i, axis=1))
    name, reason = _dicom_without_pixels(data, picture)
    before = files_of(data)
    r = run_cli("pretrain_byol.py", "--data", str(data), "--epochs", "1", "--max-steps", "1", "--batch-size", "4",
                "--projector-hidden", "16", "--predictor-hidden", "16", "--out", str(tmp_path / "run"),
                env={"MEDSSL_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"error: cannot read image {data / name} (") and reason in lines[0], lines[0]
    assert files_of(data) == before
