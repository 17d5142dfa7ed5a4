from conftest import Project
from conftest import invoke


def test_upgrade_records_success_rows(project: Project) -> None:
    project.write("a1", None, "await session.execute(sa.text('CREATE TABLE t (x INTEGER)'))")
    project.write("b2", "a1", "await session.execute(sa.text('INSERT INTO t VALUES (1)'))")
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 0, result.stderr
    rows = project.db.tracker()
    assert [(r.revision, r.status) for r in rows] == [("a1", "success"), ("b2", "success")]
    assert project.db.query("SELECT x FROM t")[0].x == 1
