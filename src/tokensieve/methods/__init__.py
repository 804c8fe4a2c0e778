from .base import LLMMethod, Method, MethodError, list_methods, make_method, method_class, register

__all__ = ["LLMMethod", "Method", "MethodError", "list_methods", "make_method", "method_class", "register"]
