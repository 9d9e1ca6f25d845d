"""selfdistill: the stages (one module each, named as in dvc.yaml, runnable as
`python -m tasks.<stage>`; no stage imports another) and the library code they call, one
subpackage per concern: core/, sampling/, sandbox/, commands/."""
