"""Streaming a WebDataset cache over HTTP (`train --stream`): shards checked against the manifest,
reads that time out and retry a bounded number of times, and one clear error naming the URL.

Servers run on 127.0.0.1 in threads: one serving the cache (optionally with one shard corrupted),
one that accepts connections and never answers, and a port nobody listens on."""
from __future__ import annotations

import functools
import http.server
import socket
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cache_fakes import build_tiny  # noqa: E402

from spot_fast.cache import CacheError, WdsReader, open_cache  # noqa: E402
from spot_fast.cache.fetch import fetch_shard  # noqa: E402
from spot_fast.train.data import StreamBatches  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wds_cache(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("s") / "c", n=8, format="wds", chunk_images=4, dtype="int8").path


class _Handler(http.server.SimpleHTTPRequestHandler):
    corrupt: str | None = None          # a file name whose bytes are served with one byte flipped

    def log_message(self, *args):
        pass

    def send_head(self):
        if self.corrupt and self.path.endswith(self.corrupt):
            data = bytearray((Path(self.directory) / self.corrupt).read_bytes())
            data[len(data) // 2] ^= 0xFF
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(bytes(data))
            return None
        return super().send_head()


@pytest.fixture
def serve():
    servers = []

    def start(folder: Path, corrupt: str | None = None) -> str:
        handler = type("H", (_Handler,), {"corrupt": corrupt})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"
    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _urls(base: str, n: int) -> list[str]:
    return [f"{base}/shard-{i:05d}.tar" for i in range(n)]


def _rows(reader) -> dict[int, torch.Tensor]:
    return {int(i): f for b in reader for i, f in zip(b["index"], b["features"])}


def test_streamed_shards_equal_the_local_ones(wds_cache, serve):
    manifest = open_cache(wds_cache, allow_random_init=True).manifest
    base = serve(wds_cache)
    http_rows = _rows(WdsReader(_urls(base, 2), 4, manifest=manifest, drop_last=False, rank=0, world_size=1))
    local_rows = _rows(WdsReader([str(wds_cache / f"shard-{i:05d}.tar") for i in range(2)], 4, manifest=manifest,
                                 drop_last=False, rank=0, world_size=1))
    assert sorted(http_rows) == sorted(local_rows) and len(http_rows) == 8
    for k in http_rows:
        torch.testing.assert_close(http_rows[k], local_rows[k], rtol=0, atol=0)


def test_corrupt_streamed_shard_is_refused_naming_the_url(wds_cache, serve):
    manifest = open_cache(wds_cache, allow_random_init=True).manifest
    base = serve(wds_cache, corrupt="shard-00001.tar")
    batches = StreamBatches(_urls(base, 2), manifest, 4, seed=0)
    with pytest.raises(CacheError, match=r"shard-00001\.tar: its \d+ bytes do not match the manifest's checksum"):
        for _ in batches.epoch(0):
            pass


def test_server_that_never_answers_times_out_and_stops(wds_cache):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)                  # connections complete in the backlog; nothing is ever sent back
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/shard-00000.tar"
    try:
        with pytest.raises(CacheError, match=r"shard-00000\.tar: no answer in time .*2 tries.*--train-cache"):
            fetch_shard(url, None, timeout=0.3, tries=2, pause=0.01)
    finally:
        listener.close()


def test_refused_host_is_one_line_with_the_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                           # nobody listens there now
    with pytest.raises(CacheError, match=rf"127\.0\.0\.1:{port}/shard-00000\.tar: cannot connect") as e:
        fetch_shard(f"http://127.0.0.1:{port}/shard-00000.tar", None, timeout=1, tries=2, pause=0.01)
    assert "\n" not in str(e.value)


def test_urls_that_do_not_match_the_manifest_are_refused(wds_cache):
    manifest = open_cache(wds_cache, allow_random_init=True).manifest
    with pytest.raises(CacheError, match="3 shard URLs for a cache of 2 shards"):
        WdsReader(["a", "b", "c"], 4, manifest=manifest, rank=0, world_size=1)
