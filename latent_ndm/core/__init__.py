"""The mathematics and the model: process functions, schedules, F, the NDM, its loss, noise, codecs (no configs, no
networks).
"""
