"""Derives d2am_jax/data/models/face_mesh_triangles.txt from MediaPipe's face mesh edge list.

  python experiments/tools/face_mesh_triangles.py FACE_MESH_CONNECTIONS_PY OUT_TXT

FACE_MESH_CONNECTIONS_PY: mediapipe/python/solutions/face_mesh_connections.py from the
mediapipe 0.10.14 wheel (Apache-2.0). The triangles are the 3-cliques of FACEMESH_TESSELATION;
the eye and mouth openings, left open by the mesh, are closed with a fan per opening so that the
depth map has no holes inside the face (a PRNet map has none either).
"""

import collections
import importlib.util
import sys

import numpy as np


def main(src: str, out: str) -> None:
    spec = importlib.util.spec_from_file_location("fmc", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    edges = {tuple(sorted(e)) for e in mod.FACEMESH_TESSELATION}
    adj = collections.defaultdict(set)
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    tris = sorted({tuple(sorted((a, b, c))) for a in adj for b in adj[a] for c in adj[a] & adj[b]})
    uses = collections.Counter(tuple(sorted(e)) for t in tris
                               for e in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2])))
    border = [e for e, n in uses.items() if n == 1]
    nxt = collections.defaultdict(list)
    for a, b in border:
        nxt[a].append(b)
        nxt[b].append(a)
    loops, seen = [], set()
    for start in sorted(nxt):
        if start in seen:
            continue
        loop, prev, cur = [start], None, start
        seen.add(start)
        while True:
            step = [v for v in nxt[cur] if v != prev and (v not in seen or v == start)]
            if not step or step[0] == start:
                break
            prev, cur = cur, step[0]
            loop.append(cur)
            seen.add(cur)
        loops.append(loop)
    loops.sort(key=len)
    # The longest loop is the face's outline; the others are the two eyes and the mouth.
    fans = [(loop[0], loop[i], loop[i + 1]) for loop in loops[:-1] for i in range(1, len(loop) - 1)]
    print(f"{len(tris)} mesh triangles, openings of {[len(lp) for lp in loops[:-1]]} vertices, "
          f"outline {len(loops[-1])}; {len(fans)} fan triangles")
    allt = np.array(tris + fans, np.int64)
    np.savetxt(out, allt, fmt="%d", header="MediaPipe face mesh (468 landmarks) triangles, "
               "derived by experiments/tools/face_mesh_triangles.py; Apache-2.0")


if __name__ == "__main__":
    main(*sys.argv[1:3])
