"""sandboxd.proxy"""
