"""sandboxd.templates"""
