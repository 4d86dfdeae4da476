"""Two writers racing for one output name, each in its own forked process (for the exclusive-create tests)."""
import multiprocessing

from loraprune.errors import OutputExistsError


def report(seed, queue, save) -> None:
    """Run ``save()`` and put ``(seed, "saved")`` or ``(seed, the refusal's message)`` on ``queue``."""
    try:
        save()
        queue.put((seed, "saved"))
    except OutputExistsError as err:
        queue.put((seed, str(err)))


def race(target, out, seeds=(1, 2), timeout=120) -> tuple[dict, list]:
    """Run ``target(seed, out, barrier, queue)`` in one forked process per seed (the barrier lets the
    writers meet mid-write); returns ``({seed: "saved" or the refusal}, the seeds that saved)``."""
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(len(seeds)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(seed, out, barrier, queue)) for seed in seeds]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    results = dict(queue.get(timeout=10) for _ in procs)
    return results, [s for s, r in results.items() if r == "saved"]


def race_in_threads(saves: dict, timeout=120) -> tuple[dict, list]:
    """Run each of ``saves`` (``{key: a function that saves}``) in its own thread at once; returns
    ``({key: "saved" or the refusal}, the keys that saved)``."""
    import threading

    results = {}

    def run(key):
        try:
            saves[key]()
            results[key] = "saved"
        except OutputExistsError as err:
            results[key] = str(err)

    threads = [threading.Thread(target=run, args=(key,)) for key in saves]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return results, [k for k, r in results.items() if r == "saved"]
