"""The shape students read: short lines and functions in the product's files, the course path
before the machinery in payment_api.py, and no import cycle among the project's modules."""
import ast
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent
PRODUCT = sorted(path for path in HERE.glob("*.py")
                 if not path.name.startswith("test_") and path.name != "conftest.py")
PROJECT_MODULES = {path.stem for path in PRODUCT}


def parsed(path):
    return ast.parse(path.read_text(), filename=str(path))


def test_the_product_files_are_the_ones_we_expect():
    assert {"payment_api", "history", "openapi", "tracing"} <= PROJECT_MODULES


def test_no_line_of_the_product_is_longer_than_99_characters():
    long_lines = [f"{path.name}:{number} ({len(line)})"
                  for path in PRODUCT
                  for number, line in enumerate(path.read_text().splitlines(), 1)
                  if len(line) > 99]
    assert long_lines == []


def test_no_function_of_the_product_is_longer_than_40_lines():
    long_functions = [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
                      for path in PRODUCT for node in ast.walk(parsed(path))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > 40]
    assert long_functions == []


def test_one_statement_a_line():
    crowded = []
    for path in PRODUCT:
        seen = {}
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.stmt):
                if node.lineno in seen and seen[node.lineno] is not node:
                    crowded.append(f"{path.name}:{node.lineno}")
                seen.setdefault(node.lineno, node)
    assert crowded == []


def imported_project_modules(path):
    """The project's modules that `path` imports anywhere, inside functions too."""
    names = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names & PROJECT_MODULES


def test_no_import_cycle_among_the_projects_modules():
    graph = {path.stem: imported_project_modules(path) - {path.stem} for path in PRODUCT}

    def reaches(start, goal, seen=()):
        return any(name == goal or (name not in seen and reaches(name, goal, (*seen, name)))
                   for name in graph[start])
    cycles = [module for module in graph if reaches(module, module)]
    assert cycles == [], graph


def test_payment_api_imports_no_extra_that_imports_it():
    """Extras import the module or take it as an argument; the module never imports them back,
    so `python payment_api.py` never loads payment_api.py a second time."""
    importers = {path.stem for path in PRODUCT if "payment_api" in imported_project_modules(path)}
    assert importers, "history.py imports payment_api"
    assert imported_project_modules(HERE / "payment_api.py") & importers == set()


def test_the_course_path_comes_before_the_machinery_in_the_order_a_payment_travels():
    source = (HERE / "payment_api.py").read_text()
    banners = ["PART I: THE COURSE PATH", "1. settings", "2. the request", "3. the payment",
               "4. processing", "5. metrics", "6. exports", "7. HTTP", "8. scenarios",
               "9. the application", "PART II: THE MACHINERY", "connection guards",
               "idempotency keys", "start-up plumbing"]
    positions = [source.index("-- " + banner if banner[0].islower() or banner[0].isdigit()
                              else "== " + banner) for banner in banners]
    assert positions == sorted(positions)


def test_the_course_path_runs_without_the_machinery_being_read_first():
    """Every name Part I uses at import time is defined in Part I: the machinery attaches later."""
    source = (HERE / "payment_api.py").read_text()
    part_one = source[:source.index("# ================================================================ "
                                    "PART II")]
    code = part_one + "\nprint('course path loaded')\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=HERE, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "course path loaded"
