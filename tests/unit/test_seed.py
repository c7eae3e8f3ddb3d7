"""NoCloud seeds: the ISO writer read back by isoinfo/blkid/xorriso, user-data checks, merging."""

from __future__ import annotations

import email
import io
import shutil
import stat
import struct
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from vmrun import seed
from vmrun.cli.seed import cmd_seed
from vmrun.errors import UsageError
from vmrun.iso9660 import SECTOR, iso_name, write_iso

needs_isoinfo = pytest.mark.skipif(shutil.which("isoinfo") is None, reason="needs isoinfo")

USER_DATA = b"#cloud-config\nusers:\n  - name: alice\nruncmd:\n  - [echo, hi]\nhostname: mine\n"
META = b"instance-id: iid-test\n"
BIG = bytes((i * 7 + i // 2048) % 256 for i in range(100 * 1024))


def make_iso(tmp_path: Path, files: dict[str, bytes], **kwargs: Any) -> Path:
    buffer = io.BytesIO()
    write_iso(buffer, files, volume_id="cidata", **kwargs)
    path = tmp_path / "seed.iso"
    path.write_bytes(buffer.getvalue())
    return path


def isoinfo(*args: str) -> bytes:
    return subprocess.run(["isoinfo", *args], check=True, capture_output=True).stdout


def listed_names(listing: bytes) -> set[str]:
    return {line.split()[-1] for line in listing.decode().splitlines()
            if line[:1] in ("-", "d")} - {".", ".."}


FILES = {"user-data": USER_DATA, "meta-data": META, "network-config": b"version: 2\n",
         "big": BIG, "empty": b""}


# --- ISO 9660 writer -------------------------------------------------------------------

@needs_isoinfo
def test_isoinfo_sees_label_joliet_and_rock_ridge(tmp_path: Path) -> None:
    out = isoinfo("-d", "-i", str(make_iso(tmp_path, FILES))).decode()
    assert "Volume id: cidata" in out.splitlines()
    assert "Joliet with UCS level 3 found" in out
    assert "Rock Ridge signatures version 1 found" in out


@needs_isoinfo
@pytest.mark.parametrize("mode", ["-R", "-J"])
def test_names_come_out_exactly(tmp_path: Path, mode: str) -> None:
    iso = make_iso(tmp_path, FILES)
    assert listed_names(isoinfo(mode, "-l", "-i", str(iso))) == set(FILES)


@needs_isoinfo
def test_plain_iso_names_and_rock_ridge_modes(tmp_path: Path) -> None:
    iso = make_iso(tmp_path, FILES)
    assert listed_names(isoinfo("-l", "-i", str(iso))) == {
        "USER_DAT.;1", "META_DAT.;1", "NETWORK_.;1", "BIG.;1", "EMPTY.;1"}
    rows = isoinfo("-R", "-l", "-i", str(iso)).decode().splitlines()
    modes = {row.split()[-1]: row.split()[0] for row in rows if row[:1] in ("-", "d")}
    assert modes["user-data"] == "-r--r--r--"
    assert modes["."] == "dr-xr-xr-x"


@needs_isoinfo
@pytest.mark.parametrize("name", ["user-data", "meta-data", "big", "empty"])
@pytest.mark.parametrize("mode", ["-R", "-J"])
def test_extracts_exact_bytes(tmp_path: Path, name: str, mode: str) -> None:
    iso = make_iso(tmp_path, FILES)
    assert isoinfo(mode, "-x", f"/{name}", "-i", str(iso)) == FILES[name]


def test_layout_is_sector_aligned_and_deterministic(tmp_path: Path) -> None:
    first = make_iso(tmp_path, FILES).read_bytes()
    second = make_iso(tmp_path, dict(reversed(FILES.items()))).read_bytes()
    assert first == second
    assert len(first) % SECTOR == 0
    assert first[16 * SECTOR + 1:16 * SECTOR + 6] == b"CD001"


def test_python_reads_the_primary_volume_descriptor(tmp_path: Path) -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    data = make_iso(tmp_path, FILES, timestamp=when).read_bytes()
    pvd = data[16 * SECTOR:17 * SECTOR]
    assert pvd[0] == 1 and pvd[1:6] == b"CD001" and pvd[6] == 1
    assert pvd[40:72] == b"cidata".ljust(32)
    size_le, size_be = struct.unpack("<I", pvd[80:84])[0], struct.unpack(">I", pvd[84:88])[0]
    assert size_le == size_be == len(data) // SECTOR
    assert struct.unpack("<H", pvd[128:130]) == struct.unpack(">H", pvd[130:132]) == (SECTOR,)
    assert pvd[813:830] == b"2024050607080900\0"
    root = pvd[156:190]
    extent = struct.unpack("<I", root[2:6])[0]
    assert struct.unpack(">I", root[6:10])[0] == extent
    directory = data[extent * SECTOR:]
    assert directory[32] == 1 and directory[33] == 0  # "." record
    assert directory[34:41] == b"SP\x07\x01\xbe\xef\x00"  # SUSP marker, Rock Ridge in use
    svd = data[17 * SECTOR:18 * SECTOR]
    assert svd[0] == 2 and svd[88:91] == b"%/E"
    assert svd[40:72].decode("utf-16-be").rstrip() == "cidata"
    assert data[18 * SECTOR:18 * SECTOR + 7] == b"\xffCD001\x01"


@pytest.mark.skipif(shutil.which("blkid") is None, reason="needs blkid")
def test_blkid_finds_the_cidata_label(tmp_path: Path) -> None:
    iso = make_iso(tmp_path, FILES)
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(iso)],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert label == "cidata"


@pytest.mark.skipif(shutil.which("xorriso") is None, reason="needs xorriso")
def test_xorriso_lists_the_names(tmp_path: Path) -> None:
    iso = make_iso(tmp_path, FILES)
    out = subprocess.run(["xorriso", "-indev", str(iso), "-find"],
                         capture_output=True, text=True, check=True).stdout
    # xorriso prints paths relative to the root, as './user-data'.
    names = {line.strip().strip("'").removeprefix("./").lstrip("/") for line in out.splitlines()}
    assert set(FILES) <= names


def test_iso_names() -> None:
    assert iso_name("user-data") == "USER_DAT.;1"
    assert iso_name("a.tar.gz") == "A_TAR.GZ;1"
    assert iso_name(".hidden") == "_HIDDEN.;1"


@needs_isoinfo
def test_clashing_iso_names_are_made_unique(tmp_path: Path) -> None:
    files = {"user-data": b"1", "user-datb": b"2", "a:b": b"3", "a?b": b"4"}
    iso = make_iso(tmp_path, files)
    plain = listed_names(isoinfo("-l", "-i", str(iso)))
    assert len(plain) == 4
    assert listed_names(isoinfo("-R", "-l", "-i", str(iso))) == set(files)
    assert len(listed_names(isoinfo("-J", "-l", "-i", str(iso)))) == 4


@needs_isoinfo
def test_many_files_span_directory_sectors(tmp_path: Path) -> None:
    files = {f"file-{i:03d}-with-a-long-name": str(i).encode() for i in range(60)}
    iso = make_iso(tmp_path, files)
    assert listed_names(isoinfo("-R", "-l", "-i", str(iso))) == set(files)
    assert listed_names(isoinfo("-J", "-l", "-i", str(iso))) == set(files)
    assert isoinfo("-R", "-x", "/file-059-with-a-long-name", "-i", str(iso)) == b"59"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "nul\0", "x" * 65])
def test_refuses_names_that_are_not_plain_file_names(name: str) -> None:
    with pytest.raises(UsageError, match="ISO file name"):
        write_iso(io.BytesIO(), {name: b""}, volume_id="cidata")


def test_refuses_bad_volume_ids() -> None:
    for volume_id in ["", "x" * 17, "caf\u00e9"]:
        with pytest.raises(UsageError, match="volume id"):
            write_iso(io.BytesIO(), {}, volume_id=volume_id)


# --- user-data -------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "kind"), [
    (USER_DATA, "cloud-config"),
    (b"#cloud-config\n", "cloud-config"),
    (b"#!/bin/sh\necho hi\n", "script"),
    (b"#include\nhttps://example.com/ud\n", "include"),
    (b"#cloud-boothook\n#!/bin/sh\n", "cloud-boothook"),
])
def test_validate_user_data_kinds(data: bytes, kind: str) -> None:
    assert seed.validate_user_data(data) == kind


def multipart_user_data() -> bytes:
    return seed.merge_cloud_config(b"#!/bin/sh\necho hi\n", {"runcmd": ["true"]})


def test_validate_multipart() -> None:
    assert seed.validate_user_data(multipart_user_data()) == "multipart"


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(UsageError, match="line 3") as caught:
        seed.validate_user_data(b"#cloud-config\nusers:\n\t- name: alice\n")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("data", [
    b"#cloud-config\n- a\n- b\n", b"#cloud-config\njust a string\n",
])
def test_non_mapping_cloud_config_is_refused(data: bytes) -> None:
    with pytest.raises(UsageError, match="not a mapping"):
        seed.validate_user_data(data)


@pytest.mark.parametrize("data", [
    b"hello world\n", b"", b"\x89PNG\r\n", b"#cloud-config\n\xff\xfe\n",
    b"MIME-Version: 1.0\nContent-Type: text/plain\n\nhi\n",
    b"Content-Type: multipart/mixed; boundary=\"XX\"\n\nno parts here\n",
])
def test_garbage_user_data_is_refused(data: bytes) -> None:
    with pytest.raises(UsageError):
        seed.validate_user_data(data)


# --- merging ---------------------------------------------------------------------------

EXTRA: dict[str, Any] = {
    "users": [{"name": "vmrun", "ssh_authorized_keys": ["ssh-ed25519 AAAA vmrun"]}],
    "runcmd": [["vmrun-agent"]],
    "hostname": "vmrun",
    "write_files": [{"path": "/etc/vmrun", "content": "x"}],
}


def test_cloud_config_merge_appends_lists_and_user_scalars_win() -> None:
    merged = seed.merge_cloud_config(USER_DATA, EXTRA)
    assert merged.startswith(b"#cloud-config\n")
    config = yaml.safe_load(merged)
    assert config["users"] == [{"name": "alice"}, *EXTRA["users"]]
    assert config["runcmd"] == [["echo", "hi"], ["vmrun-agent"]]
    assert config["hostname"] == "mine"
    assert config["write_files"] == EXTRA["write_files"]
    assert seed.validate_user_data(merged) == "cloud-config"


def test_nested_mappings_merge() -> None:
    user = b"#cloud-config\napt:\n  sources:\n    a: {source: x}\n  preserve: true\n"
    config = yaml.safe_load(seed.merge_cloud_config(
        user, {"apt": {"sources": {"b": {"source": "y"}}, "preserve": False}}))
    assert config["apt"] == {"sources": {"a": {"source": "x"}, "b": {"source": "y"}},
                             "preserve": True}


def test_scalar_where_vmrun_adds_a_list_is_refused() -> None:
    with pytest.raises(UsageError, match="'users'"):
        seed.merge_cloud_config(b"#cloud-config\nusers: alice\n", EXTRA)


def parts_of(data: bytes) -> list[tuple[str, bytes, email.message.Message]]:
    message = email.message_from_bytes(data)
    assert message.is_multipart() and not message.defects
    parts = []
    for part in message.walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            parts.append((part.get_content_type(), payload, part))
    return parts


@pytest.mark.parametrize("script", [b"#!/bin/sh\necho hi\n", "#!/bin/sh\necho \u00e9\n".encode()])
def test_script_becomes_multipart_with_both_parts(script: bytes) -> None:
    merged = seed.merge_cloud_config(script, EXTRA)
    assert seed.validate_user_data(merged) == "multipart"
    parts = parts_of(merged)
    assert [kind for kind, _, _ in parts] == ["text/x-shellscript", "text/cloud-config"]
    assert parts[0][1] == script
    ours = parts[1]
    assert ours[2]["Merge-Type"] == seed.MERGE_HOW
    config = yaml.safe_load(ours[1])
    assert config["runcmd"] == EXTRA["runcmd"] and config["merge_how"] == seed.MERGE_HOW
    assert script not in merged.split(b"\n--")[-1]  # not appended after the MIME body


def test_multipart_user_data_is_kept_as_a_nested_part() -> None:
    user = multipart_user_data()
    merged = seed.merge_cloud_config(user, {"packages": ["curl"]})
    kinds = [kind for kind, _, _ in parts_of(merged)]
    assert kinds == ["text/x-shellscript", "text/cloud-config", "text/cloud-config"]
    assert parts_of(merged)[0][1] == b"#!/bin/sh\necho hi\n"


# --- meta-data -------------------------------------------------------------------------

def test_fresh_instance_ids_differ() -> None:
    first, second = (yaml.safe_load(seed.meta_data()) for _ in range(2))
    assert first["instance-id"] != second["instance-id"]
    assert first["instance-id"].startswith("iid-vmrun-")
    assert first["local-hostname"] == "vmrun"


def test_pinned_instance_id_and_hostname() -> None:
    meta = yaml.safe_load(seed.meta_data(instance_id="iid-pinned", hostname="box"))
    assert meta == {"instance-id": "iid-pinned", "local-hostname": "box"}


def test_user_meta_data_instance_id_is_kept() -> None:
    meta = seed.meta_data(user_meta=b"instance-id: iid-user\nlocal-hostname: h\nfoo: 1\n")
    assert yaml.safe_load(meta) == {"instance-id": "iid-user", "local-hostname": "h", "foo": 1}
    assert seed.instance_id_of(meta) == "iid-user"
    assert seed.instance_id_of(seed.meta_data(instance_id="a", user_meta=meta)) == "a"


def test_bad_meta_data_is_refused() -> None:
    with pytest.raises(UsageError, match="not a mapping"):
        seed.meta_data(user_meta=b"- a\n")
    with pytest.raises(UsageError, match="instance-id"):
        seed.meta_data(instance_id="has space")


# --- writing and the command line ------------------------------------------------------

@needs_isoinfo
def test_write_seed_is_atomic_and_read_only(tmp_path: Path) -> None:
    out = tmp_path / "seed.iso"
    seed.write_seed(out, user_data=USER_DATA, meta_data=META, network_config=b"version: 2\n")
    assert stat.S_IMODE(out.stat().st_mode) == 0o444
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]
    assert isoinfo("-R", "-x", "/network-config", "-i", str(out)) == b"version: 2\n"
    seed.write_seed(out, user_data=USER_DATA, meta_data=META)  # replaces
    assert listed_names(isoinfo("-R", "-l", "-i", str(out))) == {"user-data", "meta-data"}


@needs_isoinfo
def test_cli_writes_seed_and_prints_instance_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "ud").write_bytes(USER_DATA)
    (tmp_path / "md").write_bytes(b"instance-id: iid-from-file\n")
    out = tmp_path / "seed.iso"
    assert cmd_seed([str(out), "--user-data", str(tmp_path / "ud"),
                     "--meta-data", str(tmp_path / "md"), "--hostname", "box"]) == 0
    assert capsys.readouterr().out == "iid-from-file\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o444
    assert isoinfo("-R", "-x", "/user-data", "-i", str(out)) == USER_DATA
    meta = yaml.safe_load(isoinfo("-R", "-x", "/meta-data", "-i", str(out)))
    assert meta == {"instance-id": "iid-from-file", "local-hostname": "box"}

    with pytest.raises(UsageError, match="already exists"):
        cmd_seed([str(out), "--user-data", str(tmp_path / "ud")])
    assert cmd_seed([str(out), "--user-data", str(tmp_path / "ud"), "--force",
                     "--instance-id", "iid-forced"]) == 0
    assert capsys.readouterr().out == "iid-forced\n"


def test_cli_bad_user_data_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "ud").write_bytes(b"#cloud-config\nusers: [\n")
    out = tmp_path / "seed.iso"
    with pytest.raises(UsageError) as caught:
        cmd_seed([str(out), "--user-data", str(tmp_path / "ud")])
    assert "\n" not in str(caught.value) and caught.value.hint
    assert not out.exists()


def test_cli_missing_input_and_options(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--user-data"):
        cmd_seed([str(tmp_path / "x.iso"), "--user-data", str(tmp_path / "missing")])
    with pytest.raises(UsageError):
        cmd_seed([str(tmp_path / "x.iso")])
