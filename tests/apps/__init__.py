"""Real framework apps the route-template tests run under uvicorn."""
