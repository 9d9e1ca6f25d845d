"""The `selfdistill` command line (cli.py dispatches): tools around the pipeline, not stages."""
