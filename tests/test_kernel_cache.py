"""The kernel library's cache under what goes wrong on real machines: a file cut short by a crash, a
container too small to compile in, a compiler killed midway, two processes starting at once, a CC
that is not a command. Each ends in a rebuild, or one line and the PyTorch path, never a crash."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest

from inferlab import cgroup, kernels
from inferlab.kernels import builder


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty kernel cache of the test's own, and the session's library, to copy into it."""
    current = builder.build()
    monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path))
    (tmp_path / "kernels").mkdir()
    kernels.library.cache_clear()
    yield tmp_path / "kernels", current
    kernels.library.cache_clear()


def copying(current, calls: list):
    """A stand-in for the compile-and-link step that puts the session's library in place."""
    def build(cc, isas, calls_h, lib):
        calls.append(lib)
        shutil.copy(current, lib)
    return build


def test_a_library_cut_short_is_built_again_not_loaded(cache, monkeypatch, caplog):
    """(Loading one killed every start with SIGBUS, and nothing ever rebuilt it.)"""
    folder, current = cache
    assert builder._damaged(current) is None
    lib = folder / current.name
    for damage in (current.read_bytes()[: current.stat().st_size // 2], current.read_bytes()[:4096], b"",
                   b"garbage" * 100):
        lib.write_bytes(damage)
        assert builder._damaged(lib) in ("cut short", "not an ELF file")
        calls: list = []
        monkeypatch.setattr(builder, "_build", copying(current, calls))
        assert builder.build() == lib and calls == [lib]
        assert builder._damaged(lib) is None
    assert "is cut short: building it again" in caplog.text and "is not an ELF file: building it again" in caplog.text
    monkeypatch.setattr(builder, "_build", lambda *a: pytest.fail("a whole library is not built again"))
    assert kernels.library() is not None


def test_a_container_without_room_for_a_compiler_is_told_at_once(cache, monkeypatch, caplog):
    """(In 512 MiB a compiler thrashed for over six minutes with no word; in 384 MiB eleven were killed.)"""
    monkeypatch.setattr(cgroup, "memory_limit", lambda: (512 << 20, 280 << 20))
    monkeypatch.setattr(builder, "_compile", lambda *a: pytest.fail("no compiler is started"))
    assert kernels.library() is None
    assert "this container's memory limit leaves 280 MiB free, and building the kernels takes up to 450 MiB" \
        in caplog.text


def test_a_killed_compiler_stops_the_build(monkeypatch, tmp_path):
    """An out-of-memory kill fails the build at once: the files after it are not compiled, to be killed too."""
    src = tmp_path / "src" / "generic"
    src.mkdir(parents=True)
    for name in ("a", "b", "c", "d"):
        (src / f"{name}.c").write_text(f"int {name}_generic(void) {{ return 0; }}\n")
    log = tmp_path / "compiled"
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *b.c*) kill -9 $$;; esac\nexec cc "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builder, "ROOT", tmp_path / "src")
    monkeypatch.setattr(builder, "compiled_isas", lambda: ["generic"])
    monkeypatch.setattr(builder, "compilers", lambda: 1)
    with pytest.raises(subprocess.CalledProcessError) as e:
        builder.build()
    assert e.value.returncode < 0
    compiled = log.read_text()
    # (c.c may have started as b.c was killed, before the build saw it)
    assert "/a.c" in compiled and "/b.c" in compiled and "/d.c" not in compiled
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))


def test_two_starts_at_once_build_once(cache, monkeypatch):
    folder, current = cache
    calls: list = []
    build = copying(current, calls)

    def slow(*args):
        time.sleep(0.5)  # the other start arrives meanwhile, and waits
        build(*args)
    monkeypatch.setattr(builder, "_build", slow)
    found = []
    threads = [threading.Thread(target=lambda: found.append(builder.build())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and found == [folder / current.name] * 2


def test_a_stale_build_folder_goes_on_a_cache_hit_too(cache):
    folder, current = cache
    shutil.copy(current, folder / current.name)
    stale, fresh = folder / "tmpold", folder / "tmpnew"
    for d in (stale, fresh):
        d.mkdir()
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    assert builder.build() == folder / current.name
    assert not stale.exists() and fresh.exists()  # (one an hour old may be another start's, still building)


@pytest.mark.parametrize("cc, message", [
    ('gcc "', "CC='gcc \"' cannot be read as a command: No closing quotation"),
    ("false", "false failed with exit status 1 and printed nothing"),
])
def test_a_broken_cc_is_one_line_and_the_pytorch_path(cache, monkeypatch, caplog, cc, message):
    monkeypatch.setenv("CC", cc)  # another digest: not the session's library, so a build is tried
    assert kernels.library() is None
    assert message in caplog.text


def test_a_library_lacking_an_entry_point_is_not_used(cache, caplog):
    """(One with cpu_features_generic alone was a traceback, `the kernel library has no ..._generic`.)"""
    folder, _ = cache
    src = folder / "part.c"
    src.write_text("void cpu_features_generic(int *a, int *b) { (void)a; (void)b; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(folder / "part.so")], check=True)
    kernels.build, real = (lambda: folder / "part.so"), kernels.build
    try:
        assert kernels.library() is None
    finally:
        kernels.build = real
    assert "is not an InferLab kernel library of this version, it lacks" in caplog.text


def test_inferlab_isa_with_the_kernels_off_is_said_to_do_nothing(monkeypatch, caplog):
    monkeypatch.setenv("INFERLAB_NATIVE", "0")
    monkeypatch.setenv("INFERLAB_ISA", "bogus")
    kernels.library.cache_clear()
    kernels.native.cache_clear()
    try:
        assert kernels.native() is None
    finally:
        kernels.library.cache_clear()
        kernels.native.cache_clear()
    assert "INFERLAB_ISA=bogus does nothing while INFERLAB_NATIVE turns the kernels off" in caplog.text
