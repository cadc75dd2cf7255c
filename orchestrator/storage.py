"""The sweep's --storage as one filesystem, local or remote (pyarrow's, as Ray uses): what the
sweep itself reads and writes there beside Ray (its state file, shared pre-trainings)."""
from __future__ import annotations


def filesystem(path: str):
    """(pyarrow filesystem, path on it) for a local path or a URI (s3://, gs://, file://)."""
    import pyarrow.fs
    if "://" not in path:
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.FileSystem.from_uri(path)


def kind(path: str) -> str:
    """"file", "dir" or "none"."""
    import pyarrow.fs
    fs, rel = filesystem(path)
    t = fs.get_file_info(rel).type
    return {pyarrow.fs.FileType.File: "file", pyarrow.fs.FileType.Directory: "dir"}.get(t, "none")


def read_bytes(path: str) -> bytes:
    fs, rel = filesystem(path)
    with fs.open_input_stream(rel) as f:
        return f.read()


def write_bytes(path: str, payload: bytes) -> None:
    """Written under a temporary name and moved: a writer killed mid-write leaves no file
    that looks finished."""
    fs, rel = filesystem(path)
    fs.create_dir(rel.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(rel + ".tmp") as f:
        f.write(payload)
    fs.move(rel + ".tmp", rel)
