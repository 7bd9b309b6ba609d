#!/usr/bin/env python3
"""gen_tree.py DIR N SEED: a deterministic node_modules-like tree of N files.

Sizes: ~72% under 4 KiB, ~25.5% 4-32 KiB, ~2.3% 64-256 KiB, ~0.2% 1-3 MiB; text-like,
compressible content (like real JavaScript packages)."""
import os
import random
import sys

d, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 9))) for _ in range(3000)]
corpus = (" ".join(r.choice(words) + (";\n" if r.random() < .1 else "") for _ in range(400000))).encode()
pkgs = [f"pkg-{i}" for i in range(max(1, n // 40))]
for i in range(n):
    p = r.random()
    size = (r.randint(20, 4096) if p < .72 else r.randint(4096, 32768) if p < .975
            else r.randint(65536, 262144) if p < .998 else r.randint(1 << 20, 3 << 20))
    pkg = r.choice(pkgs)
    sub = r.choice(["", "lib/", "dist/", "src/", "lib/util/", "dist/esm/"])
    path = os.path.join(d, "node_modules", pkg, sub, f"f{i}.js")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    off = r.randrange(0, len(corpus) - min(size, len(corpus) - 1))
    body = corpus[off:off + size]
    while len(body) < size:
        body += corpus[:size - len(body)]
    with open(path, "wb") as f:
        f.write(f"// {pkg} file {i} seed {seed}\n".encode() + body)
