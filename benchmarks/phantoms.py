"""Speed of phantom generation and subject simulation at real sizes.

Prints one JSON line per measurement (seconds, wall clock). The first brain call in a process
also loads the ICBM152 template (reported separately as ``template_load``).

  python benchmarks/phantoms.py [--repeats=2]
"""

import argparse
import json
import os
import sys
import time

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import brain_anatomy  # pylint: disable=wrong-import-position
from data_prep import phantoms  # pylint: disable=wrong-import-position
from data_prep import shapes  # pylint: disable=wrong-import-position
from data_prep import simulate  # pylint: disable=wrong-import-position


def _timed(name, fn, **info):
  start = time.perf_counter()
  out = fn()
  print(json.dumps({"benchmark": "phantoms", "what": name,
                    "seconds": round(time.perf_counter() - start, 3), **info}), flush=True)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  _timed("template_load", brain_anatomy.load_template)
  for rep in range(args.repeats):
    for shape in ((160, 192, 160), None):
      label = "natural_176x208x176" if shape is None else "x".join(map(str, shape))
      _timed("brain_phantom", lambda s=shape: phantoms.brain_phantom(rep, s, lesions=True),
             shape=label, repeat=rep)
      _timed("simulate_subject_chi",
             lambda s=shape: simulate.simulate_subject("brain", rep, shape=s, lesions=True),
             shape=label, repeat=rep)
    _timed("simulate_subject_cosmos",
           lambda: simulate.simulate_subject("brain", rep, lesions=True, target="cosmos"),
           shape="natural_176x208x176", repeat=rep)
    _timed("shapes_phantom", lambda: shapes.shapes_phantom(rep), shape="natural_128^3",
           repeat=rep)
    _timed("simulate_subject_shapes", lambda: simulate.simulate_subject("shapes", rep),
           shape="natural_128^3", repeat=rep)


if __name__ == "__main__":
  main()
