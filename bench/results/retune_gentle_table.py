"""Prints the §2.12 table from repair_bench JSON reports (rows: unrepaired, each method, clean baseline)."""
import json, sys
for path in sys.argv[1:]:
    r = json.load(open(path))
    ep = r["retune"]["epochs"]
    print(f"\n{path}: lr {r['retune']['lr']} freeze_bn {r['retune']['freeze_bn']} n {r['retune']['n']}")
    print("| model | seed | row | ACC | ASR | retuned ASR " + " / ".join(map(str, ep)) + f" ep | ACC after {ep[-1]} ep |")
    print("|---|---|---|---|---|---|---|")
    f = lambda v: f"{100*v:.1f}"
    for name, e in r["attacks"].items():
        rows = [("unrepaired", e["before"], e.get("retune"))]
        rows += [(m, x, x.get("retune")) for m, x in e["methods"].items()]
        if "clean_baseline" in e:
            rows.append(("clean model", e["clean_baseline"], e["clean_baseline"]["retune"]))
        for label, x, rt in rows:
            s = " / ".join(f(rt[f"asr_{k}"]) for k in ep) if rt else ""
            a = f(rt[f"acc_{ep[-1]}"]) if rt else ""
            print(f"| {name} | {r['config'].get('seed', '')} | {label} | {f(x['acc'])} | {f(x['asr'])} | {s} | {a} |")
