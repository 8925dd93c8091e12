"""Template build time from a Dockerfile: cold, after a COPY source change, and cached, in one run.

- cold: every step runs (``--no-cache``: fresh layer keys), then flatten, checksum, envd gate
  (the envd layer, keyed by the bundle, stays cached);
  FROM ``e2bdev/base`` is the already-built local base (its ~40 s debootstrap is not counted);
- COPY changed: one source file differs, so the steps before the COPY come from the layer cache
  and the rest run again, then flatten, checksum, envd gate (a new build id);
- cached: nothing changed: every layer and the published build are verified and reused.

The builder is called in process, as ``sandboxd template build`` does. Builds and layers made
only for the cold runs are removed again.

Usage: benchmarks/template_build.py [N]   (N runs each, default 5; needs root)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from sandboxd.templates.builder import builder_for
from sandboxd.templates.dockerfile import cache_context_files, spec_from_dockerfile

DATA_DIR = Path(os.environ.get("SANDBOXD_BENCH_DATA_DIR", "/var/lib/sandboxd-test"))
DOCKERFILE = """\
FROM e2bdev/base
ENV APP_HOME=/opt/app PIP_NO_CACHE_DIR=1
RUN mkdir -p $APP_HOME/data && for i in $(seq 1 200); do echo "row $i" > $APP_HOME/data/$i.txt; done
RUN python3 -c "import json; json.dump({'ok': True}, open('/opt/app/config.json', 'w'))"
COPY app/ /opt/app/
WORKDIR /opt/app
RUN python3 -m compileall -q /opt/app
USER user
RUN echo "ready" > /home/user/ready.txt
"""


def make_context(root: Path) -> Path:
    (root / "app" / "pkg").mkdir(parents=True)
    (root / "Dockerfile").write_text(DOCKERFILE)
    for i in range(100):
        (root / "app" / "pkg" / f"mod{i}.py").write_text(f"VALUE = {i}\n" + "# padding\n" * 200)
    (root / "app" / "main.py").write_text("print('hello')\n")
    (root / "app" / "blob.bin").write_bytes(os.urandom(4 << 20))
    return root


def timed(builder, spec) -> tuple[float, str]:
    t0 = time.perf_counter()
    result = builder.build(spec, lambda *_: None)
    return time.perf_counter() - t0, result.build.build_id


def main(n: int) -> None:
    builder = builder_for(DATA_DIR)
    with tempfile.TemporaryDirectory(prefix="sbx-bench-tpl-") as tmp:
        ctx = make_context(Path(tmp) / "ctx")
        spec = spec_from_dockerfile(ctx / "Dockerfile", ctx)
        cache_context_files(spec, ctx, builder.files)
        timed(builder, spec)  # warm: base verified, layers and build present
        layers_before = set(builder.layers.list())
        throwaway: list[str] = []
        cold, changed, cached = [], [], []
        for i in range(n):
            seconds, build_id = timed(builder, replace(spec, force=True))
            cold.append(seconds)
            throwaway.append(build_id)
            (ctx / "app" / "main.py").write_text(f"print('hello {i}')\n")
            changed_spec = spec_from_dockerfile(ctx / "Dockerfile", ctx)
            cache_context_files(changed_spec, ctx, builder.files)
            seconds, build_id = timed(builder, changed_spec)
            changed.append(seconds)
            throwaway.append(build_id)
            cached.append(timed(builder, spec)[0])
        for build_id in set(throwaway):
            builder.store.remove(build_id)
        for key in set(builder.layers.list()) - layers_before:
            builder.layers.remove(key)
    rows = [("cold (every step runs)", cold), ("COPY source changed", changed), ("cached (nothing changed)", cached)]
    print(f"\nTemplate build from a Dockerfile (9 steps, 4 MB context, FROM the local base), {n} runs each\n")
    print(f"| {'build':<26} | {'median':>8} | {'min':>8} | {'max':>8} |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for label, values in rows:
        print(f"| {label:<26} | {statistics.median(values):7.2f}s | {min(values):7.2f}s | {max(values):7.2f}s |")
    print(f"\ncached is {statistics.median(cold) / statistics.median(cached):.1f}x faster than cold (medians)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
