"""``python -m algos.bench SUITE ...`` (see ``algos.bench``)."""

from algos.bench.harness import main

if __name__ == "__main__":
    main()
