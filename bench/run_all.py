"""Run every benchmark and print its numbers (`make bench`)."""
import os
import platform
import subprocess
import sys

BENCHES = ["bench.dag", "bench.data_stages", "bench.eda_split", "bench.near_dups", "bench.loader", "bench.train_speed", "bench.tta"]

if __name__ == "__main__":
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    for name in BENCHES:
        print(f"\n== {name}", flush=True)
        subprocess.run([sys.executable, "-m", name], check=True)
