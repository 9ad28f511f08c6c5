#!/bin/bash
# usage: run.sh VENV_DIR WORKDIR
PY=$1/.venv/bin/python; W=$2; rm -rf $W; mkdir -p $W; cd $W
$PY - <<'PYEOF'
import numpy as np, onnx
from onnx import helper, numpy_helper
for k in range(3):
    rng = np.random.default_rng(k); c = 32
    inits = [numpy_helper.from_array(rng.normal(0, .5, (c, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(1, .1, c).astype(np.float32), "s"),
             numpy_helper.from_array(rng.normal(0, .1, c).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, .1, c).astype(np.float32), "m"),
             numpy_helper.from_array(rng.uniform(.5, 2, c).astype(np.float32), "v")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1]*4),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", 1, ["N", c, 8, 8])], inits)
    import os; os.makedirs(f"in{k}", exist_ok=True)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), f"in{k}/m.onnx",
              save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
PYEOF
B="$PY -m bnfold.cli.main"
echo "== P4: three concurrent folds to one -o, renames delayed 0.7 s"
mkdir hook; cat > hook/sitecustomize.py <<'H'
import os, time
_r = os.replace
def replace(src, dst, *a, **k):
    if str(dst).endswith((".onnx", ".data")): time.sleep(0.7)
    return _r(src, dst, *a, **k)
os.replace = replace
H
for k in 0 1 2; do PYTHONPATH=$W/hook $B fold in$k/m.onnx -o race/o.onnx >/dev/null 2>race$k.err & done; wait
echo "exits: $(cat race*.err | grep -c error) error lines; folder: $(ls race | tr '\n' ' ')"
$PY -c "import onnxruntime as o,numpy as np; s=o.InferenceSession('race/o.onnx'); print('o.onnx runs:', s.run(None,{'x':np.ones((1,3,8,8),np.float32)})[0].shape)" 2>&1 | tail -1 | cut -c1-200
echo "== P7: --report in a folder that cannot be made (a file is in the way)"
echo x > blocker
$B fold in0/m.onnx -o p7/f.onnx --frozen-output p7/fr.onnx --report blocker/r.json; echo "exit $?; p7: $(ls p7 2>/dev/null | tr '\n' ' ')"
echo "== P10a: SIGKILL during a fold, then a second fold to the same folder"
$B fold in0/m.onnx -o p10/f.onnx >/dev/null 2>&1 & P=$!; for i in $(seq 100); do ls -a p10 2>/dev/null | grep -q bnfold- && break; sleep 0.05; done; kill -9 $P; wait $P 2>/dev/null
echo "after kill: $(ls -a p10 | grep bnfold | tr '\n' ' ')"
$B fold in1/m.onnx -o p10/g.onnx >/dev/null 2>&1; echo "after a second run: $(ls -a p10 | grep -v '^\.*$' | tr '\n' ' ')"
echo "== P10b: -o newdir/"
$B fold in0/m.onnx -o newdir/ 2>&1 | tail -1; echo "exit ${PIPESTATUS[0]}; newdir is: $(stat -c %F newdir 2>/dev/null || echo absent)"
echo "== P10c: a 250-character output name"
N=$(printf 'f%.0s' $(seq 245)).onnx
$B fold in0/m.onnx -o long/$N 2>&1 | tail -1 | cut -c1-200; echo "exit ${PIPESTATUS[0]}"
echo "== P10d: -o on a symlink"
echo "someone else's" > victim; mkdir sl; ln -s ../victim sl/o.onnx
$B fold in0/m.onnx -o sl/o.onnx >/dev/null 2>&1; echo "exit $?; sl/o.onnx is: $(stat -c %F sl/o.onnx); victim: $(head -c 20 victim)"
echo "== P10e: a write error (folder /proc)"
$B fold in0/m.onnx -o /proc/x.onnx 2>&1 | tail -1; echo "exit ${PIPESTATUS[0]}"
echo "== stale-data cleanup of a foreign file named like ours"
mkdir cl; echo "user's backup" > cl/o.onnx.backup.data; $B fold in0/m.onnx -o cl/o.onnx >/dev/null 2>&1; echo "cl: $(ls cl | tr '\n' ' ')"
echo "== API fold(path, output=path)"
cp -r in2 same; $PY -c "
import bnfold,hashlib
h=hashlib.sha256(open('same/m.onnx','rb').read()).hexdigest()
try: bnfold.fold('same/m.onnx', output='same/m.onnx'); print('no error')
except Exception as e: print(type(e).__name__, str(e)[:120])
print('input unchanged:', h==hashlib.sha256(open('same/m.onnx','rb').read()).hexdigest())"
