"""The sweep: batch inference and evaluation over a grid of guidance scales x sampling steps x rollout lengths x
methods (standard, gnsnet, oracle, best_of_K), with counted costs, paired statistics, plots and a report.

    grid.py    the cells of a grid and the batch-runner units (folders) that make their images
    cost.py    denoiser rows counted by a forward hook; the RNN rollout's FLOPs per denoiser evaluation
    job.py     SweepJob (what scripts/sweep.py asks for), its checks and the settings a rerun must keep
    run.py     run_sweep: make every missing image through the batch runner, score, tabulate, plot, report
    scores.py  per-unit reward scores (resumable) and best_of_K's selection
    table.py   sweep.csv: means, paired differences vs standard and vs the tuned guidance, costs
    plots.py   reward vs guidance, reward vs cost (the frontier), gain vs rollout length
    report.py  report.html
"""
