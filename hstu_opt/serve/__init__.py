"""`hstu-opt serve`: an HTTP server over a bundle. Needs the `serve` extra (fastapi, uvicorn, prometheus-client).

Importing hstu_opt.serve does not import fastapi; hstu_opt.serve.app does.
"""
