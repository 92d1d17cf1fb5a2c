"""The live worker (`pql worker`). streams/worker/app.py assembles it and lists the parts."""
