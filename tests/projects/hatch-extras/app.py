from hatch_web import create_app

app = create_app()
