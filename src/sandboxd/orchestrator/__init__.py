"""sandboxd.orchestrator"""
