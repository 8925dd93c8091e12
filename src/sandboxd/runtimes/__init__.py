"""sandboxd.runtimes"""
